"""The reading options of the benchmarks that read with retrieval: the library's one declaration
(:func:`landmark.inference.options.add_retrieval_arguments`), checked and turned into the one options
object (:class:`landmark.inference.options.Reading`), and that object turned back into command-line
options for a benchmark's worker subprocesses. Scripts run as ``python benchmarks/<name>.py`` find this
module next to them."""

from __future__ import annotations

import argparse

from landmark.inference.options import Reading, check_chunk_len, check_retrieval_arguments


def parse_reading(
    parser: argparse.ArgumentParser, args: argparse.Namespace, block_size: int | None = None
) -> Reading:
    """The checked reading of parsed options (``check_retrieval_arguments``; with ``block_size``,
    ``--chunk-len`` must hold a block too): ``Reading.from_args(args)``, or the parser's usage error
    (exit status 2) before any work is done."""
    try:
        check_retrieval_arguments(args)
        if block_size is not None:
            check_chunk_len(args, block_size)
    except ValueError as e:
        parser.error(str(e))
    return Reading.from_args(args)


def reading_argv(reading: Reading) -> list[str]:
    """The options of ``add_retrieval_arguments`` that parse back into ``reading`` (what a benchmark
    passes on to its worker subprocesses). ``compile`` is not a command-line option: a reading with
    ``compile=True`` is refused."""
    if reading.compile:
        raise ValueError("compile is not a command-line option: pass a reading with compile=False")
    argv = ["--k", str(reading.k), "--granularity", reading.granularity, "--search", reading.search,
            "--kernel", reading.kernel, "--chunk-len", str(reading.chunk_len), "--block-dtype",
            reading.block_dtype]  # fmt: skip
    if reading.block_folder is not None:
        argv += ["--block-folder", str(reading.block_folder)]
    if reading.memory_device is not None:
        argv += ["--memory-device", str(reading.memory_device)]
    if reading.max_blocks is not None:
        argv += ["--max-blocks", str(reading.max_blocks)]
    return argv
