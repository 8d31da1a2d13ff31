"""The demo's results as the paper's tables (markdown) and a plot (PNG)."""

from __future__ import annotations

from pathlib import Path

FIXED_ROWS = ("Teacher (DPO)", "Teacher SFT (reference)", "Student (untrained)", "SFT")


def _cell(stat: dict | None, digits: int = 3) -> str:
    if not stat:
        return "-"
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}" if stat["n"] > 1 else f"{stat['mean']:.{digits}f}"


def markdown_table(results: dict) -> str:
    """Table 1 / Table 2 style: mean reward (greedy, sampled) and win rates vs ADPA and vs SFT."""
    seeds = results["seeds"]
    lines = [
        f"Ground-truth reward on {results['config']['world']['num_test']} held-out prompts, "
        f"{seeds} seed(s) per student method (mean ± std over seeds); win rates per prompt, ties count 1/2.",
        "",
        "| method | setting | reward (greedy) | reward (sampled) | WR vs ADPA (greedy) | WR vs ADPA (sampled) "
        "| WR vs SFT (greedy) | WR vs SFT (sampled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["methods"].items():
        setting = ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.get("setting", {}).items())
        cells = [name, setting or "-", _cell(row.get("reward_greedy")), _cell(row.get("reward_sampled"))]
        cells += [_cell(row.get(f"win_rate_vs_{b}_{m}"), 2) for b in ("ADPA", "SFT") for m in ("greedy", "sampled")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Example greedy responses (first test prompts):", ""]
    for name, row in results["methods"].items():
        shown = "; ".join(f"`{e['prompt']}` → `{e['greedy']}`" for e in row.get("examples", [])[:2])
        lines.append(f"- {name}: {shown}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    """Bars of mean reward per method (greedy and sampled, with std over seeds), and loss curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["methods"])
    fig, (bars, curves) = plt.subplots(1, 2, figsize=(18, 6), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.4
    for offset, mode in ((-width / 2, "greedy"), (width / 2, "sampled")):
        stats = [results["methods"][n][f"reward_{mode}"] for n in names]
        bars.bar([i + offset for i in range(len(names))], [s["mean"] for s in stats], width,
                 yerr=[s["std"] for s in stats], capsize=3, label=mode)
    bars.set_xticks(range(len(names)), names, rotation=60, ha="right", fontsize=8)
    bars.set_ylabel("ground-truth reward (test)")
    bars.axhline(0, color="black", linewidth=0.5)
    bars.legend()
    bars.set_title("mean reward per method")
    # Stage 0, then each method's chosen setting (seed 0).
    lines = {k: v for k, v in results["curves"].items() if k.startswith(("teacher", "student SFT"))}
    lines |= {name: row["curve"] for name, row in results["methods"].items() if row.get("curve")}
    for label, points in lines.items():
        steps, losses = zip(*points)
        curves.plot(steps, losses, label=label, linewidth=1)
    curves.set_xlabel("step")
    curves.set_ylabel("training loss")
    curves.set_title("training curves")
    curves.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
