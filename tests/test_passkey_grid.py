"""benchmarks/passkey_grid.py: cells of several `landmark eval passkey` outputs summed per (model, task,
length, depth), the markdown table, the heatmap."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script():
    """benchmarks/passkey_grid.py as a module (it imports results_json from its folder)."""
    spec = importlib.util.spec_from_file_location("passkey_grid", BENCHMARKS / "passkey_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(model, depth, correct, trials, task="passkey", haystack="repeat", keys=1, length=16384):
    """One cell as `landmark eval passkey` writes it."""
    return {
        "model": model, "kind": "hf-landmark", "task": task, "haystack": haystack, "keys_per_prompt": keys,
        "length": length, "depth": depth, "accuracy": correct / trials, "correct": correct,
        "trials": trials, "answers": None, "keys": [], "seconds": 10.0 * trials,
    }  # fmt: skip


def test_cells_of_two_seeds_add_up_and_tasks_stay_apart(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    grid = load_script()
    first = [result("lm", 0.0, 2, 2), result("lm", 1.0, 1, 2), result("lm", 0.0, 0, 2, haystack="books")]
    second = [
        result("lm", 0.0, 1, 2),
        result("lm", 1.0, 2, 2),
        result("lm", 0.0, 1, 2, task="multikey", keys=4),
    ]
    paths = []
    for i, results in enumerate((first, second)):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"args": {}, "results": results}))
    cells = grid.merge(paths, {"lm": "landmark"})
    got = {(c["model"], c["task"], c["depth"]): (c["correct"], c["trials"]) for c in cells}
    assert got == {
        ("landmark", "passkey", 0.0): (3, 4),
        ("landmark", "passkey", 1.0): (3, 4),
        ("landmark", "books", 0.0): (0, 2),
        ("landmark", "multikey-4", 0.0): (1, 2),
    }
    lines = grid.table(cells).splitlines()
    assert lines[2] == "| landmark | passkey | 16384 | 3/4 | 3/4 | 6/8 |"
    assert lines[3] == "| landmark | books | 16384 | 0/2 | - | 0/2 |"

    out, png = tmp_path / "grid.json", tmp_path / "grid.png"
    monkeypatch.setattr(
        "sys.argv", ["passkey_grid.py", *map(str, paths), "--out", str(out), "--png", str(png)]
    )
    grid.main()
    assert len(json.loads(out.read_text())["cells"]) == 4 and png.stat().st_size > 1000


def test_other_retrieval_settings_are_a_model_of_their_own(tmp_path, monkeypatch):
    """Cells of the same landmark model evaluated with --granularity token are not summed with the default
    settings' cells; a base model (no retrieval) is named as it is."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    grid = load_script()
    base = dict(result("base", 0.0, 0, 1), kind="hf")
    files = [
        ({"k": 4, "granularity": "token_head", "chunk_len": 256}, [result("lm", 0.0, 1, 2), base]),
        ({"k": 4, "granularity": "token", "chunk_len": 256}, [result("lm", 0.0, 2, 2), base]),
        ({"k": 2, "granularity": "token", "chunk_len": 128}, [result("lm", 0.0, 0, 2)]),
    ]
    paths = []
    for i, (args, results) in enumerate(files):
        paths.append(tmp_path / f"{i}.json")
        paths[-1].write_text(json.dumps({"args": args, "results": results}))
    cells = grid.merge(paths, {"lm": "landmark"})
    got = {c["model"]: (c["correct"], c["trials"]) for c in cells}
    assert got == {
        "landmark": (1, 2),
        "base": (0, 2),
        "landmark (token)": (2, 2),
        "landmark (k=2, token, chunks of 128)": (0, 2),
    }
