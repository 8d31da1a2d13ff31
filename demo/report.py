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


# -- research reports: several world replicates, paired intervals, the paper's claims ---------------

TABLES = (
    ("Table 1 in miniature", ("SFT", "DPO", "SimPO", "VanillaKD", "SeqKD", "DCKD", "ADPA", "ADPA+")),
    ("Table 2 in miniature (ablations)", ("DCKD", "DCKD w/o y_l", "DCKD w/o DPO teacher", "ADPA", "ADPA w/o reference",
                                          "ADPA w/o SFT term")),
    ("KD variants, the release preset and online samples", ("ADPA", "Q-argmax KD", "Q-softmax KD",
                                                              "ADPA (release preset)", "ADPA online")),
)


def _setting(setting: dict | None) -> str:
    if not setting:
        return "-"
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in setting.items())


def _signed(x: float, digits: int = 3) -> str:
    return f"{x:+.{digits}f}"


def _interval(stat: dict | None, digits: int = 3, center: float = 0.0) -> str:
    """`+0.012 [−0.020, +0.045]`, bold when the interval excludes `center`, with the worlds' signs."""
    if not stat:
        return "-"
    if center:
        text = f"{stat['mean']:.{digits}f} [{stat['low']:.{digits}f}, {stat['high']:.{digits}f}]"
    else:
        text = f"{_signed(stat['mean'], digits)} [{_signed(stat['low'], digits)}, {_signed(stat['high'], digits)}]"
    agree = stat["worlds_positive"] if stat["mean"] > center else stat["worlds_negative"]
    text += f" {agree}/{stat['worlds']}"
    return f"**{text}**" if stat["low"] > center or stat["high"] < center else text


def _mean_sd(stat: dict) -> str:
    return f"{stat['mean']:.3f} ± {stat['std']:.3f}" if stat["n"] > 1 else f"{stat['mean']:.3f}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min {secs} s" if hours else f"{minutes} min {secs} s"


def _method_table(world: dict, names: tuple[str, ...]) -> list[str]:
    lines = [
        "| method | setting | reward (greedy) | Δ vs ADPA (greedy) | WR vs ADPA (greedy) | reward (sampled) "
        "| Δ vs ADPA (sampled) | WR vs ADPA (sampled) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in names:
        row = world["methods"].get(name)
        if row is None:
            continue
        cells = [name, _setting(row.get("setting"))]
        for mode in ("greedy", "sampled"):
            cells += [_mean_sd(row[f"reward_{mode}"]), _interval(row.get(f"diff_vs_ADPA_{mode}")),
                      _interval(row.get(f"win_rate_vs_ADPA_{mode}"), 2, center=0.5)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _verdict_cell(entry: dict, question: bool) -> str:
    verdict = entry["verdict"]
    if question:
        verdict = {"holds": "first higher", "reversed": "second higher", "undecided": "undecided"}[verdict]
    return f"{_interval(entry)} {verdict}"


def _claims_table(results: dict, questions: bool) -> list[str]:
    lines = ["| claim | ordering | world | greedy: Δ [95% CI] worlds, verdict | sampled: Δ [95% CI] worlds, verdict |",
             "|---|---|---|---|---|"]
    for name, world in results["worlds"].items():
        for claim in world["claims"]:
            if claim["question"] != questions:
                continue
            order = f"{claim['better']} vs {claim['worse']}" if questions else f"{claim['better']} > {claim['worse']}"
            lines.append(f"| {claim['key']} | {order} | {name} | {_verdict_cell(claim['greedy'], questions)} | "
                         f"{_verdict_cell(claim['sampled'], questions)} |")
    return lines


def _search_lines(world: dict) -> list[str]:
    summary = world["search_summary"]
    config = world["config"]
    lines = [
        f"Settings per method before extension: {', '.join(map(str, summary['settings_per_method']))}; chosen on "
        f"world 0's validation split ({config['world']['num_validation']} prompts, score: "
        f"{config['search']['select_on']} reward, seed 0), at most {config['search']['max_extensions']} "
        f"extension(s) per method. **{summary['methods_extended']} of {summary['methods']} methods had their grid "
        f"extended ({summary['extensions']} extension(s) in all); {len(summary['still_at_edge'])} still sat at an "
        f"edge when the cap was reached{': ' + ', '.join(summary['still_at_edge']) if summary['still_at_edge'] else ''}.** "
        f"{summary['settings_trained']} settings trained for the search.",
        "",
        "| method | grid as written | extensions | settings tried | chosen | validation score | still at an edge |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in world["search"].items():
        grid = config["methods"][name]["grid"]
        written = "; ".join(f"{k}: {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}"
                            for k, vs in grid.items())
        grown = ", ".join(f"{e['axis']} {e['direction']} to {e['value']:g}" for e in s["extensions"]) or "none"
        best = max(s["validation"], key=lambda v: v["reward"])
        chosen = world["methods"][name]["setting"]
        lines.append(f"| {name} | {written} | {grown} | {s['settings_tried']} | {_setting(chosen)} | "
                     f"{best['reward']:.3f} | {', '.join(s['still_at_edge']) or 'no'} |")
    return lines


def research_markdown(results: dict) -> str:
    """docs/results.md from a research run: how it was made, the verdicts, then each world's tables."""
    lines = [*_how_it_was_made(results), *_how_to_read(results), *_claims(results)]
    for name, world in results["worlds"].items():
        lines += _world_section(name, world)
    return "\n".join(lines)


def _how_it_was_made(results: dict) -> list[str]:
    """The title, the command, the machine, the time and the packages."""
    env = results["environment"]
    worlds = results["worlds"]
    reused = sum(w["reused_worlds"] for w in worlds.values())
    total = sum(w["worlds"] for w in worlds.values())
    cpu = env["cpu"]
    versions = ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v)
    return [
        "# Results on the built-in preference worlds",
        "",
        "Everything below, text included, was generated by one command:",
        "",
        "```bash",
        results.get("command") or "adpa demo ...",
        "```",
        "",
        f"It took **{_duration(results['seconds'])}** of wall clock on {cpu.get('model', cpu.get('machine'))} "
        f"({cpu.get('cores')} cores; torch CPU capability {env['torch_cpu_capability']}), with "
        f"{env['torch_threads']} torch thread(s) per student training and one per service. Load average "
        f"(1, 5, 15 min) before: `{results.get('load_before')}`; after: `{results.get('load_after')}`"
        " (other work on the machine slows the run but does not change its numbers)."
        + (f" {reused} of {total} world replicates were reused from an earlier run of the same command, so the "
           "time covers only the rest." if reused else ""),
        "",
        f"Packages: {versions}; Python {env['python']}; started from commit {env.get('git_commit') or 'unknown'}"
        + (f" with {env['git_code_changes']} uncommitted code file(s)" if env.get("git_code_changes") else "")
        + ". The full "
        "record (configs, every setting tried with its validation score, every interval, package versions, "
        "torch threads, CPU flags) is [`results.json`](results.json).",
        "",
        "**Reproducing.** The runs are deterministic on one machine: the same command there gives the same "
        "numbers. Another CPU, thread count or library version changes floating-point round-off, hence the "
        "trained weights, and single runs can then order methods differently; the numbers reproduce within the "
        "intervals below, which is why the intervals include the world replicates (the data, the teachers and "
        "the SFT student are part of the noise, not only the student seed).",
        "",
    ]


def _how_to_read(results: dict) -> list[str]:
    """What the columns mean, how settings were chosen, and the caveats."""
    worlds = results["worlds"]
    first = next(iter(worlds.values()))
    return [
        "## How to read the numbers",
        "",
        f"- Each world kind is built {first['worlds']} times (world replicates: world seed, teachers and SFT "
        f"student all redrawn and retrained) and every student method is trained with {first['seeds']} seed(s) "
        "on each: the reward columns are mean ± sd over those runs of each run's mean reward on the test prompts.",
        "- **Δ vs ADPA**: the paired difference (same world, same seed and sampling seed, same prompts) of the "
        "method's reward minus ADPA's, with its 95% bootstrap interval (4000 draws: the worlds with replacement, "
        "then each drawn world's seeds and prompts with replacement), and how many worlds' own mean differences "
        "have the estimate's sign. **WR vs ADPA**: the share of (world, seed, prompt) where the method's reward "
        "beats ADPA's, ties 1/2, with the same interval. Bold: the interval excludes 0 (0.5 for win rates), "
        "which is what counts as a result here; anything else is noise at this size.",
        "- Settings are chosen once per world kind, on world 0's validation split, with every method given the "
        "same number of settings and the same grid-extension rule (`adpa.demo.search`); the test splits are read "
        "only for these tables.",
        f"- Caveats: with {first['worlds']} worlds the bootstrap over worlds has few distinct draws and its "
        "intervals are on the narrow side, so read the world counts beside them. "
        "About 5% of intervals exclude 0 by chance alone when nothing differs: among the "
        f"{sum(not c['question'] for w in worlds.values() for c in w['claims']) * 2} claim intervals below, a few "
        "results are expected from noise.",
        "",
    ]


def _claims(results: dict) -> list[str]:
    """The paper's claims with their verdicts, counted per world and decoding, then the open questions."""
    worlds = results["worlds"]
    lines = [
        "## The paper's claims, one by one",
        "",
        "Verdict per claim, world and decoding: **holds** (the interval lies above 0 in the paper's direction), "
        "**reversed** (below 0), **undecided** (the interval contains 0: the noise cannot decide).",
        "",
        *_claims_table(results, questions=False),
        "",
    ]
    for name, world in worlds.items():
        counts = {}
        for claim in world["claims"]:
            if claim["question"]:
                continue
            for mode in ("greedy", "sampled"):
                counts.setdefault(mode, {}).setdefault(claim[mode]["verdict"], []).append(claim["key"])
        for mode in ("greedy", "sampled"):
            parts = [f"{verdict} {len(keys)} ({', '.join(keys)})" for verdict, keys in sorted(counts.get(mode, {}).items())]
            lines.append(f"- {name}, {mode}: " + "; ".join(parts) + ".")
    return lines + [
        "",
        "Questions the paper does not order, measured the same way:",
        "",
        *_claims_table(results, questions=True),
        "",
        "![paired differences to ADPA](results.png)",
        "",
    ]


def _world_section(name: str, world: dict) -> list[str]:
    """One world kind: its description and sizes, the starting points, each table, the search, examples."""
    config = world["config"]
    w = config["world"]
    lines = [
        f"## World `{name}`",
        "",
        world["about"].strip() or "(no description in the config)",
        "",
        f"World seeds {', '.join(map(str, world['world_seeds']))}; {w['num_sft']} demonstrations, "
        f"{w['num_pairs']} preference pairs, {w['num_validation']} validation and {w['num_test']} test prompts "
        f"per world; tasks {', '.join(w['tasks'])} on {w['min_items']}-{w['max_items']} items; teacher "
        f"{config['teacher']['layers']} layers d={config['teacher']['hidden']}, student "
        f"{config['student']['layers']} layer(s) d={config['student']['hidden']}; {config['steps']} student steps "
        f"of {config['batch_size']} records for every method (ADPA+: half DCKD, half ADPA). Time per world "
        f"replicate: {', '.join(_duration(s) for s in world['seconds_per_world'])}.",
        "",
        "Stage 0 and the starting points (no setting to choose):",
        "",
        "| model | reward (greedy) | reward (sampled) | Δ vs ADPA (greedy) | Δ vs ADPA (sampled) |",
        "|---|---|---|---|---|",
    ]
    for row_name in FIXED_ROWS:
        row = world["methods"].get(row_name)
        if row:
            lines.append(f"| {row_name} | {_mean_sd(row['reward_greedy'])} | {_mean_sd(row['reward_sampled'])} | "
                         f"{_interval(row.get('diff_vs_ADPA_greedy'))} | {_interval(row.get('diff_vs_ADPA_sampled'))} |")
    for title, names in TABLES:
        lines += ["", f"### {title}", "", *_method_table(world, names)]
    lines += ["", "### The search", "", *_search_lines(world), "", "### Example greedy responses (world 0, seed 0)",
              ""]
    for row_name, examples in world["examples"].items():
        shown = "; ".join(f"`{e['prompt']}` → `{e['greedy']}`" for e in examples[:2])
        lines.append(f"- {row_name}: {shown}")
    lines.append("")
    return lines


def research_plot(results: dict, path: Path) -> None:
    """Per world kind and decoding: every method's paired difference to ADPA with its 95% interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = results["worlds"]
    fig, axes = plt.subplots(len(worlds), 2, figsize=(14, 5.5 * len(worlds)), squeeze=False)
    for row, (name, world) in enumerate(worlds.items()):
        names = [n for n in world["methods"] if world["methods"][n].get("diff_vs_ADPA_greedy")]
        for col, mode in enumerate(("greedy", "sampled")):
            ax = axes[row][col]
            stats = [world["methods"][n][f"diff_vs_ADPA_{mode}"] for n in names]
            means = [s["mean"] for s in stats]
            errors = [[s["mean"] - s["low"] for s in stats], [s["high"] - s["mean"] for s in stats]]
            colors = ["tab:green" if s["low"] > 0 else "tab:red" if s["high"] < 0 else "tab:gray" for s in stats]
            ax.barh(range(len(names)), means, xerr=errors, color=colors, capsize=3)
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.invert_yaxis()
            ax.axvline(0, color="black", linewidth=0.8)
            ax.set_xlabel(f"reward minus ADPA's, {mode} (95% bootstrap interval)")
            ax.set_title(f"world '{name}', {mode}: {world['worlds']} worlds x {world['seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
