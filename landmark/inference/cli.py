"""``landmark generate``: long-context generation from a trained landmark checkpoint, with retrieval.

One prompt: the text is streamed as it is generated (decoded incrementally). Several prompts
(``--prompt`` repeated, or ``--prompt-file`` with ``--batch-lines``): generated together as a batch
of rows of different lengths, each row printed when done. Mistakes the user can fix are one line
``error: ...`` with exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from landmark.checkpoint import CheckpointError, load_model
from landmark.files import os_error_line, os_error_text, path_problem
from landmark.inference.cache import StateFileError, StateFiles
from landmark.inference.generate import BlockBytes, Hooks, Sampling, check_generation_memory, generate
from landmark.inference.options import (
    Reading,
    add_device_argument,
    add_retrieval_arguments,
    add_sampling_arguments,
    add_state_arguments,
    add_weights_argument,
    check_block_folder,
    check_chunk_len,
    check_device,
    check_retrieval_arguments,
    check_sampling_arguments,
    check_save_state,
    check_utf8,
    note_k_above_blocks,
    resolve_device,
)
from landmark.inference.weights import compact_weights


def add_generate_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``landmark generate`` on the main parser's sub-commands."""
    p = subparsers.add_parser(
        "generate",
        help="generate text from a landmark checkpoint with top-k block retrieval (any prompt length)",
        description="Generate from a trained landmark model: the prompt is read in chunks into a block "
        "memory, then every new token retrieves the top-k blocks through their landmarks. "
        "See docs/inference.md.",
    )
    p.add_argument(
        "--checkpoint", required=True, metavar="RUN_DIR", help="a run folder or checkpoints/step_*"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", metavar="TEXT", help="the prompt; repeat for a batch")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a file ('-': stdin)")
    p.add_argument(
        "--batch-lines",
        action="store_true",
        help="with --prompt-file: one prompt per non-empty line",
    )
    add_sampling_arguments(p, max_new_tokens=128, temperature=0.8, top_p=0.95)
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    add_retrieval_arguments(p)
    add_state_arguments(p)
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode steps' retrieval attention (measured slower on CPU; see docs)",
    )
    add_device_argument(p)
    add_weights_argument(p)
    p.add_argument("--no-stop", action="store_true", help="do not stop at the end-of-text token")
    p.set_defaults(func=cmd_generate)


def _prompts(args: argparse.Namespace) -> list[str]:
    if args.prompt is not None:
        return [check_utf8(p, "--prompt") for p in args.prompt]
    if args.prompt_file == "-":
        try:
            text = sys.stdin.buffer.read().decode("utf-8-sig")  # (a byte-order mark is not text)
        except UnicodeDecodeError:
            raise ValueError("--prompt-file -: standard input is not UTF-8 text") from None
    else:
        path = Path(args.prompt_file)
        if not path.is_file():
            problem = path_problem(path, folder=False) or "is not a regular file"
            raise ValueError(f"--prompt-file {path} {problem}")
        try:
            text = path.read_text(encoding="utf-8-sig")  # (a byte-order mark is not text)
        except UnicodeDecodeError:
            raise ValueError(f"--prompt-file {path} is not UTF-8 text") from None
        except OSError as err:
            raise ValueError(f"--prompt-file {path} cannot be read: {os_error_text(err)}") from None
    if args.batch_lines:
        return [line for line in text.splitlines() if line.strip()]
    return [text]


def _check(args: argparse.Namespace) -> None:
    """Every option that can be checked without the model (nothing is loaded or written yet)."""
    check_retrieval_arguments(args)
    check_sampling_arguments(args)
    check_device(args.device, "--device")
    if args.batch_lines and args.prompt_file is None:
        raise ValueError("--batch-lines goes with --prompt-file")
    reads = [(args.checkpoint, "a file of --checkpoint"), (args.prompt_file, "the --prompt-file")]
    check_save_state(args, reads)
    check_block_folder(args, reads)


class _Stream:
    """Print one row's text as tokens arrive: decode everything so far, print what is new (a token
    that ends inside a multi-byte character waits for the next one)."""

    def __init__(self, tokenizer, out, skip: int | None) -> None:
        self.tokenizer, self.out, self.skip = tokenizer, out, skip
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, row: int, token: int) -> None:
        if token == self.skip:  # end of text: not printed
            return
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def finish(self) -> None:
        text = self.tokenizer.decode(self.ids)
        self.out.write(text[self.printed :] + "\n")
        self.out.flush()


def cmd_generate(args: argparse.Namespace) -> int:
    """Load a checkpoint, generate from the prompt(s), print the text."""

    try:
        _check(args)
        prompts = _prompts(args)
        if not prompts or any(not p for p in prompts):
            raise ValueError("--prompt/--prompt-file: the prompt is empty")
        # the generated ids alone, before the model is loaded (a stop token may end it, but not sooner)
        check_generation_memory([0] * len(prompts), args.max_new_tokens, option="--max-new-tokens")
        device = resolve_device(args.device)
        try:
            model, tokenizer, _ = load_model(args.checkpoint, device=device)
        except CheckpointError as err:
            raise CheckpointError(f"--checkpoint {err}") from None
        compact_weights(model, args.weights)
        cfg = model.config
        if cfg.attention != "landmark":
            raise ValueError(
                f"--checkpoint {args.checkpoint} holds a model with attention={cfg.attention!r}; "
                "`landmark generate` needs a landmark-attention model (retrieval goes through its landmarks)"
            )
        check_chunk_len(args, cfg.block_size)
        ids = [tokenizer.encode(p) for p in prompts]
        if any(not i for i in ids):
            raise ValueError("--prompt/--prompt-file: a prompt encodes to no tokens")
        if args.load_state is None:  # (a loaded state holds blocks of its own)
            note_k_above_blocks(args.k, max(map(len, ids)) + args.max_new_tokens, cfg.block_size)
        if args.no_stop and args.max_blocks is None and args.block_folder is None:  # its memory is certain
            model_dtype, retrieval = next(model.parameters()).dtype, Reading.from_args(args).retrieval
            blocks = BlockBytes.of(cfg, retrieval, model_dtype, args.memory_device or device)
            check_generation_memory([len(i) for i in ids], args.max_new_tokens, blocks, "--max-new-tokens")
    except (ValueError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    single, eot = len(ids) == 1, None if args.no_stop else tokenizer.eot_id
    stream = _Stream(tokenizer, sys.stdout, eot) if single else None
    reading = Reading.from_args(args)
    try:
        out = generate(
            model, ids, args.max_new_tokens, sampling=Sampling(args.temperature, args.top_p, args.seed),
            hooks=Hooks(() if eot is None else (eot,), stream),
            state=StateFiles(args.load_state, args.save_state, args.overwrite),
            retrieval=reading.retrieval, **reading.cache_kwargs(),
        )  # fmt: skip
    except StateFileError as err:  # a saved state of another model or batch size, found when loading it
        print(f"error: --load-state {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk while saving the state (written atomically: nothing partial)
        files = [
            (args.save_state, "--save-state"),
            (args.load_state, "--load-state"),
            (args.block_folder, "--block-folder"),
        ]
        print(f"error: {os_error_line(err, files)}", file=sys.stderr)
        return 2
    if single:
        stream.finish()
        return 0
    for row, (prompt, tokens) in enumerate(zip(prompts, out)):
        short = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        print(f"=== [{row}] {short!r} ({len(ids[row])} prompt tokens, {len(tokens)} generated)")
        print(tokenizer.decode([t for t in tokens if t != eot]))
    return 0
