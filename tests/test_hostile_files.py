"""Outputs never destroy inputs: ``--save-state``, ``plot-metrics --out`` and the one atomic writer,
as a hostile user meets them.

Every refused command exits 2 with exactly one ``error:`` line naming the option, no traceback, and
leaves every file under the test's folder byte for byte and timestamp for timestamp as it was. The
Python API refuses the same destinations with a ValueError and leaves no temporary file behind.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from landmark.checkpoint import save_checkpoint
from landmark.cli import main
from landmark.data.landmarks import insert_landmarks
from landmark.data.tokenizer import Tokenizer
from landmark.files import (
    atomic_write,
    check_output_file,
    path_problem,
    safetensors_metadata,
    write_json_atomic,
)
from landmark.inference import InferenceSession
from landmark.inference import cache as cache_module
from landmark.inference.cache import STATE_FORMAT, StateFiles, is_saved_state
from landmark.inference.options import Reading
from landmark.model import GPT, ModelConfig

BS = 16

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    """A tiny landmark checkpoint, a document, a saved state, a PNG and an unrelated file."""
    root = tmp_path_factory.mktemp("files")
    tok = Tokenizer.train(["the sea and the ship and the whale at night " * 40], vocab_size=280)
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=16, seq_len=64,
        block_size=BS, attention="landmark", landmark_id=tok.landmark_id,
    )  # fmt: skip
    config = {"model": cfg.to_dict(), "data": {"tokenizer_fingerprint": tok.fingerprint}, "train": {}}
    run = root / "run"
    save_checkpoint(run, 1, GPT(cfg), config, tok, {})
    env = {"root": root, "run": run, "ckpt": next(run.glob("checkpoints/step_*"))}
    env["doc"] = root / "doc.txt"
    env["doc"].write_text("the sea and the ship. " * 20, encoding="utf-8")
    env["notes"] = root / "notes.safetensors"
    env["notes"].write_text("my notes, not a state\n", encoding="utf-8")
    env["state"] = root / "state.safetensors"
    assert _generate(env, "--prompt", "the sea " * 10, "--save-state", str(env["state"])) == 0
    assert is_saved_state(env["state"])
    env["hf"] = root / "hf"  # a delta folder's files (the refusal comes before anything is loaded)
    env["hf"].mkdir()
    (env["hf"] / "delta.json").write_text(json.dumps({"format": "x"}), encoding="utf-8")
    (env["hf"] / "delta.safetensors").write_bytes(b"weights")
    return env


def _generate(env: dict, *args: str) -> int:
    argv = ["generate", "--checkpoint", str(env["run"]), "--max-new-tokens", "1", "--chunk-len", "32"]
    try:
        return main([*argv, *args])
    except SystemExit as exit_:
        return int(exit_.code)


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        digest = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        out[str(p.relative_to(root))] = (digest, p.stat().st_mtime_ns)
    return out


def _refused(env: dict, capsys, names: str, run) -> str:
    before = _snapshot(env["root"])
    capsys.readouterr()
    code = run()
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [err.strip()] and err.startswith("error: "), err
    assert names in err, err
    assert _snapshot(env["root"]) == before, "a refused command changed the disk"
    return err


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--prompt", "x", "--save-state", "{ckpt}/model.safetensors"], "a file of --checkpoint"),
        (
            ["--prompt", "x", "--save-state", "{ckpt}/model.safetensors", "--overwrite"],
            "a file of --checkpoint",
        ),
        (["--prompt", "x", "--save-state", "{ckpt}/config.json", "--overwrite"], "a file of --checkpoint"),
        (["--prompt-file", "{doc}", "--save-state", "{doc}"], "the --prompt-file"),
        (["--prompt-file", "{doc}", "--save-state", "{doc}", "--overwrite"], "the --prompt-file"),
        (["--load-state", "{state}", "--prompt", "x", "--save-state", "{state}"], "the --load-state file"),
        (["--prompt", "x", "--save-state", "{notes}"], "not a saved state"),
        (["--prompt", "x", "--save-state", "{root}"], "is a folder"),
        (["--prompt", "x", "--save-state", "{root}/missing/state.st"], "its folder does not exist"),
        (["--prompt", "x", "--overwrite"], "--overwrite goes with --save-state"),
    ],
    ids=lambda v: " ".join(v).replace("{", "").replace("}", "") if isinstance(v, list) else None,
)
def test_generate_never_writes_onto_an_input(env, capsys, extra, says):
    paths = {k: v for k, v in env.items() if isinstance(v, Path)}
    args = [a.format(**paths) for a in extra]
    err = _refused(env, capsys, "--save-state" if "--save-state" in extra else "--overwrite",
                   lambda: _generate(env, *args))  # fmt: skip
    assert says in err


def test_hf_generate_never_writes_onto_the_delta(env, capsys, monkeypatch):
    monkeypatch.setenv("LANDMARK_CACHE", str(env["root"] / "cache"))
    hf = env["hf"]
    for extra in ([], ["--overwrite"]):
        argv = [
            "hf",
            "generate",
            "--model",
            str(hf),
            "--prompt",
            "x",
            "--save-state",
            str(hf / "delta.safetensors"),
        ]
        err = _refused(env, capsys, "--save-state", lambda a=argv + extra: main(a))
        assert "a file of --model" in err


def test_overwrite_replaces_a_file_that_is_not_an_input(env, tmp_path, capsys):
    other = tmp_path / "old.bin"
    other.write_bytes(b"old bytes")
    assert _generate(env, "--prompt", "x", "--save-state", str(other), "--overwrite") == 0
    assert is_saved_state(other)
    again = tmp_path / "again.safetensors"  # an earlier state is replaced without --overwrite
    assert _generate(env, "--prompt", "the ship", "--save-state", str(again)) == 0
    assert _generate(env, "--prompt", "the sea", "--save-state", str(again)) == 0
    assert is_saved_state(again)
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_api_save_state_refuses_a_folder_and_other_files(env, tmp_path):
    from landmark.checkpoint import load_model

    model, tok, _ = load_model(env["run"])
    session = InferenceSession(model, 1, k=2, chunk_len=32)
    ids = torch.tensor([tok.encode("the sea and the ship " * 4)])
    session.read(insert_landmarks(ids, BS, model.config.landmark_id))
    folder = tmp_path / "folder"
    folder.mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        session.save_state(folder)
    assert list(tmp_path.iterdir()) == [folder] and list(folder.iterdir()) == []  # no stray .tmp
    doc = tmp_path / "doc.txt"
    doc.write_text("keep me")
    with pytest.raises(ValueError, match="not a saved state"):
        session.save_state(doc)
    assert doc.read_text() == "keep me"
    session.save_state(doc, overwrite=True)
    assert is_saved_state(doc)
    session.save_state(doc)  # a saved state may be replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["doc.txt", "folder"]


def test_api_generate_checks_the_state_file_before_reading(env, tmp_path):
    from landmark.checkpoint import load_model
    from landmark.inference import generate
    from landmark.inference.generate import Hooks

    model, tok, _ = load_model(env["run"])
    doc = tmp_path / "doc.txt"
    doc.write_text("keep me")
    calls = []
    with pytest.raises(ValueError, match="not a saved state"):
        generate(model, [tok.encode("the sea")], 1, k=2, chunk_len=32, state=StateFiles(save=doc),
                 hooks=Hooks(on_token=lambda *a: calls.append(a)))  # fmt: skip
    assert calls == [] and doc.read_text() == "keep me"


def test_written_files_get_the_mode_open_gives(tmp_path):
    """Weights, deltas and saved states came out 0600 (safetensors' own mode) beside 0644 files: every
    file the atomic writer makes gets 0666 minus the umask, as open() gives."""
    import stat

    from safetensors.torch import save_file

    from landmark import files

    atomic_write(tmp_path / "w.safetensors", lambda tmp: save_file({"x": torch.zeros(2)}, str(tmp)))
    write_json_atomic(tmp_path / "c.json", {"a": 1})
    for name in ("w.safetensors", "c.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~files._umask()
    assert files._umask() == os.umask(files._umask())  # the mask read is the process's (and kept)


def test_atomic_write_leaves_the_destination_and_no_temporary_file_on_failure(tmp_path):
    path = tmp_path / "out.json"
    write_json_atomic(path, {"a": 1})
    for error in (OSError("No space left on device"), KeyboardInterrupt()):

        def half_then_fail(tmp: Path, error=error) -> None:
            tmp.write_text('{"a": ')
            raise error

        with pytest.raises(type(error)):
            atomic_write(path, half_then_fail)
        assert json.loads(path.read_text()) == {"a": 1}
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]


def test_safetensors_metadata_reads_states_and_refuses_other_files(env, tmp_path):
    assert safetensors_metadata(env["state"])["format"] == STATE_FORMAT
    for content in (b"", b"short", b"\xff" * 8 + b"{}", (2).to_bytes(8, "little") + b"[]", b"x" * 100):
        bad = tmp_path / "bad"
        bad.write_bytes(content)
        assert safetensors_metadata(bad) is None
        assert not is_saved_state(bad)
    assert safetensors_metadata(tmp_path / "missing") is None


def test_check_output_file_follows_links_into_what_the_run_reads(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w")
    link = tmp_path / "link.bin"
    os.symlink(model / "weights.bin", link)
    with pytest.raises(ValueError, match=r"--out .* is the model"):
        check_output_file(link, "--out", kind="x", is_kind=lambda p: True, reads=[(model, "the model")])
    new = check_output_file(
        model / "new.bin", "--out", kind="x", is_kind=lambda p: False, reads=[(model, "m")]
    )
    assert new == model / "new.bin"  # a new file beside the model's files is not an input


def _metrics_run(folder: Path, rows: list[dict]) -> Path:
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture()
def runs(tmp_path) -> dict:
    rows = [{"step": s, "tokens": 100 * s, "loss": 5.0 / s} for s in range(1, 5)]
    out = {"root": tmp_path, "a": _metrics_run(tmp_path / "a", rows), "b": _metrics_run(tmp_path / "b", rows)}
    out["empty"] = _metrics_run(tmp_path / "empty", [])
    out["unusable"] = tmp_path / "unusable"  # no row with a finite step and loss: a blank plot was written
    out["unusable"].mkdir()
    (out["unusable"] / "metrics.jsonl").write_text('{"step": 1, "loss": NaN}\n{"step": "x", "loss": 1e999}\n')
    out["jsonl_folder"] = tmp_path / "jsonl_folder"  # a run whose metrics.jsonl is a folder
    (out["jsonl_folder"] / "metrics.jsonl").mkdir(parents=True)
    out["notes"] = tmp_path / "notes.png"
    out["notes"].write_text("not an image")
    return out


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["{a}", "{b}", "--labels", "one", "--out", "{root}/x.png"], "--labels gives 1 name(s) for 2 run(s)"),
        (["{a}", "--labels", "one", "two", "--out", "{root}/x.png"], "--labels gives 2 name(s) for 1 run(s)"),
        (["{a}", "{empty}", "--out", "{root}/x.png"], "no metrics to plot"),
        (["{unusable}", "--out", "{root}/x.png"], "no metrics to plot in"),
        (["{a}", "--out", "{root}/noext"], "--out"),
        (["{a}", "--out", "{root}/a/metrics.jsonl"], "--out"),
        (["{a}", "--out", "{a}"], "--out"),
        (["{a}", "--out", "{root}/missing/x.png"], "its folder does not exist"),
        (["{a}", "--out", "{notes}"], "exists and is not a PNG image"),
        (["{a}", "--out", "/proc/p.png"], "--out /proc/p.png: its folder /proc is not writable"),
        (["{a}", "--out", "{root}/.png"], "such as loss.png"),
        (["{a}", "--x", "minutes", "--out", "{root}/x.png"], "no metrics to plot"),  # rows with no time
        (["{a}", "{a}/", "--out", "{root}/x.png"], "two runs are named 'a' in the legend"),  # one name
        (["{a}", "{b}", "--labels", "x", "x", "--out", "{root}/x.png"], "--labels lists 'x' more than once"),
        (["{jsonl_folder}", "--out", "{root}/x.png"], "metrics.jsonl is a folder, not a metrics file"),
    ],
    ids=lambda v: " ".join(v).replace("{", "").replace("}", "") if isinstance(v, list) else None,
)
def test_plot_metrics_refuses(runs, capsys, extra, says):
    args = [a.format(**{k: v for k, v in runs.items()}) for a in extra]
    err = _refused(runs, capsys, says, lambda: main(["plot-metrics", *args]))
    assert says in err


def test_plot_metrics_draws_names_that_are_not_utf8(runs, capsys):
    """A --title or --labels of bytes that are not UTF-8 (Python keeps them as lone surrogates) ended in
    matplotlib's TypeError: shown with the replacement character."""
    out = runs["root"] / "odd.png"
    argv = ["plot-metrics", str(runs["a"]), "--title", "a\udcffb", "--labels", "c\udcffd", "--out", str(out)]
    assert main(argv) == 0
    assert out.read_bytes().startswith(b"\x89PNG")


def test_plot_metrics_writes_a_png_and_replaces_only_its_own_kind(runs, capsys):
    out = runs["root"] / "loss.png"
    assert main(["plot-metrics", str(runs["a"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out}"
    assert out.read_bytes().startswith(b"\x89PNG")
    assert main(["plot-metrics", str(runs["a"]), str(runs["b"]), "--out", str(out)]) == 0
    assert main(["plot-metrics", str(runs["a"]), "--out", str(runs["notes"]), "--overwrite"]) == 0
    assert runs["notes"].read_bytes().startswith(b"\x89PNG")
    assert not [p for p in runs["root"].iterdir() if p.name.endswith(".tmp")]


def test_perplexity_cells_are_keyed_by_the_tokens_they_read(env, tmp_path):
    """Two corpora of equal token counts: the second is evaluated, not read from the first's cells."""
    import numpy as np

    from landmark.eval.common import CellCache, load_models
    from landmark.eval.perplexity import evaluate_perplexity

    (m,) = load_models([f"lm={env['run']}"])
    rng = np.random.default_rng(0)
    landmark = m.model.config.landmark_id
    first, second = (np.where(t == landmark, landmark + 1, t) for t in rng.integers(0, 250, size=(2, 256)))
    cache = CellCache(tmp_path / "cells")

    def run(tokens):
        cells = evaluate_perplexity(
            [m], tokens, [64], cache, readings=[Reading(k=2)], max_tokens=128, progress=False
        )
        return cells[0]

    a, b = run(first), run(second)
    assert a["nll"] != b["nll"]
    assert run(first)["nll"] == a["nll"]  # the same tokens: read from the cell
    assert len(list((tmp_path / "cells" / "cells").iterdir())) == 2


@pytest.mark.parametrize("damage", [b"", b'{"key": ', b"\xff\xfe", b'{"key": {}, "result": {}}', b"[1, 2]"])
def test_a_damaged_eval_cell_is_computed_again(tmp_path, capsys, damage):
    from landmark.eval.common import CellCache

    cache, key = CellCache(tmp_path), {"eval": "x", "length": 3}
    cache.put(key, {"value": 1})
    assert cache.get(key) == {"value": 1}
    path = next((tmp_path / "cells").iterdir())
    path.write_bytes(damage)
    assert cache.get(key) is None
    assert "is damaged" in capsys.readouterr().err
    cache.put(key, {"value": 2})
    assert cache.get(key) == {"value": 2}


def _edited_state(src: Path, dest: Path, edit) -> Path:
    """A copy of the saved state ``src`` with its tensors changed by ``edit(tensors)`` (metadata kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edit(tensors)
    save_file(tensors, str(dest), metadata=meta)
    return dest


STATE_EDITS = {
    "a tensor deleted": lambda t: t.pop("layer0.tail_v"),
    "a tensor added": lambda t: t.update(extra=torch.zeros(1)),
    "a shape changed": lambda t: t.update({"layer0.keys": t["layer0.keys"][..., :-1].contiguous()}),
    "length negative": lambda t: t.update(length=-t["length"]),
    "length too short": lambda t: t.update(length=torch.zeros_like(t["length"])),
    "tail_len out of range": lambda t: t.update({"layer0.tail_len": t["layer0.tail_len"] + BS}),
    "count beyond the blocks": lambda t: t.update({"layer0.count": t["layer0.count"] + 99}),
    "count of floats": lambda t: t.update({"layer0.count": t["layer0.count"].double()}),
    "values in another dtype": lambda t: t.update({"layer0.values": t["layer0.values"].double()}),
    # bytes overwritten in the middle of the file (0xff... is a NaN in float32): no empty answer, no traceback
    "keys not finite": lambda t: t.update({"layer0.keys": t["layer0.keys"].fill_(float("nan"))}),
    # layers that disagree, a length that is not whole blocks plus the tail (each loaded and answered)
    "layers of other counts": lambda t: t.update({"layer1.count": t["layer1.count"] - 1}),
    "length off the blocks": lambda t: t.update(length=t["length"] + 1),
}


@pytest.mark.parametrize("what", list(STATE_EDITS))
def test_an_edited_saved_state_is_refused_in_one_line(env, tmp_path, capsys, what):
    edited = _edited_state(env["state"], tmp_path / "edited.safetensors", STATE_EDITS[what])
    err = _refused(env | {"root": tmp_path}, capsys, "damaged saved state",
                   lambda: _generate(env, "--load-state", str(edited), "--prompt", "the whale"))  # fmt: skip
    assert str(edited) in err


@pytest.mark.parametrize(("key", "value"), [("batch", "abc"), ("batch", "2"), ("head_dim", "-1"),
                                          ("kv_heads", "zzz"), ("dtype", "torch.float64")])  # fmt: skip
def test_a_saved_state_whose_header_disagrees_with_its_tensors_is_refused(env, tmp_path, capsys, key, value):
    """The header's batch, kv heads, head dim and dtype were not checked: an edited one loaded."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(env["state"]), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata={**meta, key: value})
    err = _refused(env | {"root": tmp_path}, capsys, f"its header says {key} = {value!r}",
                   lambda: _generate(env, "--load-state", str(edited), "--prompt", "the whale"))  # fmt: skip
    assert str(edited) in err


def test_a_saved_state_of_impossible_length_is_refused_in_one_line(env, tmp_path, capsys):
    """A length of 10**15 positions (whole blocks) made the reading reserve a block memory of 16 PB: a
    traceback from the allocator. The block memory is checked against the machine's memory first."""
    edited = _edited_state(env["state"], tmp_path / "edited.safetensors",
                           lambda t: t.update(length=t["length"] + 10**15 // BS * BS))  # fmt: skip
    err = _refused(env | {"root": tmp_path}, capsys, "blocks per stream: the block memory of one layer needs",
                   lambda: _generate(env, "--load-state", str(edited), "--prompt", "the whale"))  # fmt: skip
    assert "this machine has" in err or "has" in err


# ------------------------------------------------------------------------------- a full disk, odd files

_FULL = "Error while serializing: I/O error: No space left on device (os error 28)"  # safetensors' own words


def _full_disk(*args, **kwargs):
    """safetensors' save_file on a full disk: a SafetensorError, not an OSError."""
    raise SafetensorError(_FULL)


def test_generate_on_a_full_disk_keeps_the_earlier_state(env, tmp_path, capsys, monkeypatch):
    """`generate --save-state F` when the disk fills: one line naming --save-state and ENOSPC; F keeps the
    earlier state byte for byte and no temporary file is left beside it."""
    state = tmp_path / "book.safetensors"
    assert _generate(env, "--prompt", "the sea " * 10, "--save-state", str(state)) == 0
    before = state.read_bytes()
    monkeypatch.setattr(cache_module, "save_file", _full_disk)
    capsys.readouterr()
    code = _generate(env, "--prompt", "the ship " * 10, "--save-state", str(state))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert f"--save-state {state}" in err and "No space left on device (ENOSPC)" in err, err
    assert state.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [state.name]


def test_api_save_state_on_a_full_disk_is_an_oserror_naming_the_file(env, tmp_path, monkeypatch):
    """InferenceSession.save_state when the disk fills: an OSError with errno ENOSPC naming the file (not
    the library's SafetensorError), the earlier file intact, nothing partial."""
    from landmark.checkpoint import load_model

    model, tok, _ = load_model(env["run"])
    session = InferenceSession(model, 1, k=2, chunk_len=32)
    session.read(
        insert_landmarks(
            torch.tensor([tok.encode("the sea and the ship " * 4)]), BS, model.config.landmark_id
        )
    )
    path = tmp_path / "state.safetensors"
    session.save_state(path)
    before = path.read_bytes()
    monkeypatch.setattr(cache_module, "save_file", _full_disk)
    with pytest.raises(OSError) as caught:
        session.save_state(path)
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_atomic_write_reports_a_library_error_of_a_full_disk_as_oserror(tmp_path):
    """A writer that fails the way safetensors and torch do on a full disk (their own exception kinds,
    the errno in the message or in the exception being handled): an OSError of that errno naming the
    destination; no temporary file."""
    path = tmp_path / "out.bin"

    def torch_like(tmp: Path) -> None:
        tmp.write_bytes(b"half")
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            raise RuntimeError(
                "[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"
            ) from None

    for writer in (torch_like, _full_disk):
        with pytest.raises(OSError) as caught:
            atomic_write(path, writer)
        assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(path)
        assert list(tmp_path.iterdir()) == []


def test_check_output_file_refuses_devices_loops_and_unwritable_folders(tmp_path, monkeypatch):
    """A destination that is not a regular file (a FIFO, a device: an atomic rename would replace the
    device node itself), a symbolic link loop, a folder this user cannot write: one-line ValueErrors."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    kwargs = {"kind": "a saved state", "is_kind": lambda p: False, "overwrite": True}
    with pytest.raises(ValueError, match=r"--save-state .*fifo is not a regular file"):
        check_output_file(fifo, "--save-state", **kwargs)
    with pytest.raises(ValueError, match=r"--save-state .*loop cannot be used: .*ELOOP"):
        check_output_file(loop, "--save-state", **kwargs)
    with pytest.raises(ValueError, match=r"--save-state .* is not a regular file"):
        check_output_file("/dev/null", "--save-state", **kwargs)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(ValueError, match=r"its folder .* is not writable"):
        check_output_file(tmp_path / "new.st", "--save-state", **kwargs)


def test_generate_refuses_a_fifo_for_save_state_even_with_overwrite(env, tmp_path, capsys):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    capsys.readouterr()
    assert _generate(env, "--prompt", "x", "--save-state", str(fifo), "--overwrite") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --save-state") and "not a regular file" in err and err.count("\n") == 1
    assert fifo.exists() and not fifo.is_file()


def test_a_name_longer_than_the_file_system_takes_is_said_before_any_folder_is_made(tmp_path):
    """``p/<200 x é>`` (400 bytes): the system refuses the name only once ``p`` is made; path_problem
    says so first, naming the limit, so a refused command leaves no ``p`` behind."""
    out = tmp_path / "p" / ("é" * 200)
    assert "longer than the 255 bytes" in path_problem(out, folder=True, writable=True)
    assert path_problem(tmp_path / "p" / ("é" * 100), folder=True, writable=True) is None  # 200 bytes
    assert not (tmp_path / "p").exists()
