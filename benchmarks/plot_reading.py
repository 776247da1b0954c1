"""Plot: tokens per CPU second reading a prompt, against its length, for both model families.

Reads the JSON that ``benchmarks/prefill.py`` (the library's small GPT, landmark vs full attention) and
``benchmarks/hf_prefill.py`` (SmolLM2-135M, landmark-converted with retrieval vs its own attention)
wrote, and draws one line per model on log-log axes.

Usage:
    python benchmarks/plot_reading.py                  # -> docs/reading_speed.png
    python benchmarks/plot_reading.py --prefill A.json --hf B.json --out /tmp/reading.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
REPO = Path(__file__).resolve().parents[1]


def series(path: Path, kinds: dict[str, str]) -> dict[str, list[tuple[int, float]]]:
    """{label: [(length, tokens per CPU second), ...]} from a benchmark's JSON."""
    out: dict[str, list[tuple[int, float]]] = {label: [] for label in kinds.values()}
    if not path.is_file():
        return out
    for row in json.loads(path.read_text())["results"]:
        for key, label in kinds.items():
            cell = row.get(key, {})
            if "cpu_s" in cell:
                out[label].append((row["length"], row["length"] / cell["cpu_s"]))
    return out


def main(argv: list[str] | None = None) -> dict[str, list[tuple[int, float]]]:
    """Draw the plot; returns its lines ({label: [(length, tokens per CPU second), ...]})."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefill", default=str(RESULTS / "prefill.json"))
    p.add_argument("--hf", default=str(RESULTS / "hf_prefill_rope_skip.json"))
    p.add_argument("--out", default=str(REPO / "docs" / "reading_speed.png"))
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = series(
        Path(args.prefill),
        {"landmark": "small GPT, landmark retrieval (k=4)", "full": "small GPT, full attention"},
    )
    lines |= series(
        Path(args.hf),
        {"landmark": "SmolLM2-135M, landmark retrieval (k=4)", "base": "SmolLM2-135M, own attention"},
    )
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = ["-o", "--o", "-s", "--s"]
    for (label, points), style in zip(lines.items(), styles):
        if points:
            xs, ys = zip(*sorted(points))
            ax.plot(xs, ys, style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("tokens per CPU second (one thread)")
    ax.set_title("Reading a prompt: retrieval against full attention")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(out)
    print(f"wrote {out}")
    return lines


if __name__ == "__main__":
    main()
