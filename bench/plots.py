"""Plots (PNG) for docs/ from the benchmarks' JSON: fidelity against k, memory against positions.

    adpa bench plots                                   # docs/fidelity.png, docs/memory.png from docs/bench-runs/
    adpa bench plots --fidelity f.json real.json --memory m.json --out-dir /tmp/plots

fidelity.png: for each support (and each other string field of the rows; with several files,
each file's source: 'synthetic' for Zipf rows, else the file's name), 1 - cosine of the sparse
ADPA and KL gradients to the dense ones, and the KL value's relative error, against k, each on
a log scale with its budget (cosine >= 0.99, error <= 1%).
memory.png: a request's extra server memory against scored positions, one line per vocabulary
and support, with the 1 GiB budget and, dotted, P x V x 4 bytes (what growing with positions x V
would cost); a second panel for CUDA memory when the points have it.
An input that does not exist is skipped with a message; the exit status is 1 if nothing was drawn.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

MIB = 1 << 20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(row: dict) -> str:
    """The row's string fields (support, and e.g. a data source the benchmark adds) name its line."""
    return " / ".join(str(v) for k, v in row.items() if isinstance(v, str))


def source_name(path: str | Path, doc: dict) -> str:
    """What a fidelity file measured: 'synthetic' (Zipf rows) or the file's name without _last_run."""
    return "synthetic" if "zipf" in doc.get("config", {}) else Path(path).stem.removesuffix("_last_run")


def plot_fidelity(sources: list[tuple[str, dict]], out: Path) -> Path:
    """`sources`: (name, JSON) pairs; rows of several sources are told apart by the name."""
    panels = [  # (metric, how to draw it, title, budget on the drawn scale)
        ("adpa_grad_cosine", lambda v: 1 - v, "ADPA gradient: 1 - cosine to dense", 0.01),
        ("kl_grad_cosine", lambda v: 1 - v, "KL gradient: 1 - cosine to dense", 0.01),
        ("kl_rel_error", lambda v: 100 * abs(v), "KL value: |relative error| (%)", 1.0),
    ]
    lines: dict[str, list[dict]] = defaultdict(list)
    titles = []
    for name, doc in sources:
        rows = doc.get("results") or doc.get("rows") or []
        if not rows:
            raise ValueError(f"{name}: no rows in the fidelity JSON (expected a 'results' or 'rows' list)")
        for row in rows:
            lines[_label(row) if len(sources) == 1 else f"{name}: {_label(row)}"].append(row)
        config = doc.get("config", {})
        titles.append(f"{name}, V={config.get('vocab', doc.get('vocab_size', '?'))}, "
                      f"{config.get('positions', doc.get('positions', '?'))} positions")
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.3), constrained_layout=True)
    for ax, (metric, draw, title, budget) in zip(axes, panels):
        for label, members in lines.items():
            points = sorted((r["k"], draw(r[metric])) for r in members
                            if r.get(metric) is not None and math.isfinite(r[metric]))
            points = [(k, max(v, 1e-6)) for k, v in points]  # log scale: an exact 0 sits at the floor
            if points:
                ax.plot(*zip(*points), marker="o", label=label)
        ax.axhline(budget, color="red", linestyle="--", linewidth=1, label="budget")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("k (support size; n for sampled)")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Sparse vs dense signals (lower is better): {'; '.join(titles)}", fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_memory(doc: dict, out: Path) -> Path:
    points = doc.get("points") or []
    if not points:
        raise ValueError("no points in the memory JSON (expected a 'points' list)")
    panels = [("extra_bytes", "server RSS: extra peak memory per request")]
    if any("cuda_extra_bytes" in p for p in points):
        panels.append(("cuda_extra_bytes", "CUDA: max_memory_allocated over the request"))
    lines: dict[tuple[int, str], list[dict]] = defaultdict(list)
    for p in points:
        lines[(p["vocab"], p["support"])].append(p)
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    fig, axes = plt.subplots(1, len(panels), figsize=(9.5 * len(panels), 5), constrained_layout=True, squeeze=False)
    positions = sorted({p["positions"] for p in points})
    vocabs = sorted({v for v, _ in lines})
    colors = {v: f"C{i}" for i, v in enumerate(vocabs)}  # one colour per vocabulary, one line style per support
    styles = {"topk": "-", "dense": "--"}
    for ax, (metric, title) in zip(axes[0], panels):
        for (vocab, support), members in sorted(lines.items()):
            xy = sorted((p["positions"], max(p[metric], 1) / MIB) for p in members if metric in p)
            if xy:
                ax.plot(*zip(*xy), marker="o", color=colors[vocab], linestyle=styles.get(support, "-."),
                        label=f"V={vocab} {support}")
        for vocab in vocabs:
            ax.plot(positions, [n * vocab * 4 / MIB for n in positions], linestyle=":", color=colors[vocab],
                    linewidth=1, label=f"P x V x 4 B, V={vocab}")
        ax.axhline(1024, color="red", linestyle="--", linewidth=1, label="budget: 1 GiB (P=8k, V=128k, top-k)")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.set_xlabel("scored positions P")
        ax.set_ylabel("MiB")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    c = doc.get("config", {})
    fig.suptitle(f"Memory per request: random Llama {c.get('layers', '?')}x{c.get('hidden', '?')}, top-{c.get('k', '?')} "
                 f"vs dense, logits budget {c.get('logits_budget_mb', '?')} MiB, {c.get('device', '?')}", fontsize=10)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--fidelity", nargs="+",
                   default=["docs/bench-runs/fidelity_last_run.json", "docs/bench-runs/fidelity_real_last_run.json"],
                   help="fidelity JSON files (bench/fidelity.py, bench/fidelity_real.py), drawn together")
    p.add_argument("--memory", default="docs/bench-runs/memory_last_run.json", help="bench/memory.py's JSON")
    p.add_argument("--out-dir", default="docs", help="where fidelity.png and memory.png go")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    drawn = 0
    for name, paths in (("fidelity", args.fidelity), ("memory", [args.memory])):
        found = [path for path in paths if Path(path).exists()]
        for path in set(paths) - set(found):
            print(f"{name}: {path} not found, skipped", file=sys.stderr)
        if not found:
            continue
        docs = [(path, json.loads(Path(path).read_text())) for path in found]
        if name == "fidelity":
            out = plot_fidelity([(source_name(path, doc), doc) for path, doc in docs], out_dir / "fidelity.png")
        else:
            out = plot_memory(docs[0][1], out_dir / "memory.png")
        print(f"{name}: {', '.join(found)} -> {out}", file=sys.stderr)
        drawn += 1
    return 0 if drawn else 1


if __name__ == "__main__":
    sys.exit(main())
