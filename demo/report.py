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


def _p(p: float) -> str:
    return f"{p:.4f}" if p >= 1e-4 else f"{p:.1e}"


def _verdict_cell(entry: dict, question: bool) -> str:
    verdict = entry["verdict"]
    if question:
        verdict = {"holds": "first higher", "reversed": "second higher", "undecided": "undecided"}[verdict]
    return f"{_interval(entry)} {verdict}"


def _primary_table(results: dict) -> list[str]:
    lines = ["| claim | ordering | world | decoding | mean Δ | 95% t-interval over worlds | p (t) | p (sign-flip) "
             "| p (Holm) | worlds agreeing | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in results["primary"]:
        agree = e["worlds_positive"] if e["mean"] > 0 else e["worlds_negative"]
        verdict = f"**{e['verdict']}**" if e["verdict"] != "undecided" else e["verdict"]
        lines.append(f"| {e['key']} | {e['better']} > {e['worse']} | {e['world']} | {e['decoding']} | "
                     f"{_signed(e['mean'])} | [{_signed(e['low'])}, {_signed(e['high'])}] | {_p(e['p_t'])} | "
                     f"{_p(e['p_sign_flip'])} | {_p(e['p_holm'])} | {agree}/{e['worlds']} | {verdict} |")
    return lines


def _verdict_summary(results: dict) -> list[str]:
    """Each primary claim with its verdict per world kind, in one line each."""
    by_claim: dict[str, list[str]] = {}
    for e in results["primary"]:
        by_claim.setdefault(f"{e['key']} ({e['better']} > {e['worse']}, {e['decoding']})", []).append(
            f"{e['world']}: {e['verdict']}")
    return [f"- {claim}: {'; '.join(parts)}." for claim, parts in by_claim.items()]


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



def research_markdown(results: dict) -> str:
    """docs/results.md from a research run: how it was made, the primary claims, then the exploratory part."""
    worlds = results["worlds"]
    first = next(iter(worlds.values()))
    n_primary = len(results["primary"])
    lines = [*_how_it_was_made(results), "## Pre-registered primary claims", "",
             "Written in each world kind's config (`primary:`) before the run and decided only here. Each test "
             f"world gives one number per claim, the mean over its {first['prompts']} test prompts (and "
             f"{first['seeds']} student seed(s)) of the paired reward difference, better minus worse, under the "
             "claim's decoding. The test is a two-sided paired t-test over the test worlds (df = worlds - 1) with "
             f"its 95% t-interval; the exact sign-flip permutation p over worlds is shown beside it. **Holm** "
             f"adjusts the t-test p over all {n_primary} primary tests (every claim in each of the {len(worlds)} world "
             "kinds, one "
             "family). Verdict: **holds** (Holm p < 0.05, mean > 0), **reversed** (Holm p < 0.05, mean < 0), "
             "else undecided.",
             "", *_primary_table(results), "",
             "![per-world paired differences of the primary claims](results.png)", "",
             "Each dot is one test world's mean difference; the bar is the mean over worlds with its 95% "
             "t-interval.", "", "### Verdicts", "", *_verdict_summary(results), "",
             *_scope(results), *_how_to_read(results), "## Exploratory (no correction; not the claims above)", "",
             "The paper's other orderings and the primary claims under the other decoding, each with its "
             "prompt-level bootstrap interval (worlds, seeds and prompts resampled; bold when it excludes 0) and "
             "the uncorrected world-level t-test p. Read them as descriptions, not decisions.", "",
             *_claims_table(results, questions=False), "", *_claims_table(results, questions=True), ""]
    for name, world in worlds.items():
        lines += _world_section(name, world)
    return "\n".join(lines)


def _scope(results: dict) -> list[str]:
    """What a miniature like this shows about the paper: the count of decided claims, then words fixed
    before the run."""
    verdicts = [e["verdict"] for e in results["primary"]]
    counted = ", ".join(f"{verdicts.count(v)} {v}" for v in ("holds", "reversed", "undecided"))
    return [
        "### What this shows and what it does not", "",
        f"Of the {len(verdicts)} primary tests: {counted}.", "",
        "It shows, for tiny transformers on synthetic list tasks with a known reward, whether each ordering "
        "survives world-to-world variation (data, teachers and SFT student redrawn) after a fixed, equal tuning "
        "budget and a correction for testing five claims in several world kinds. It does not show anything about "
        "7B/8B models, open-ended chat, AlpacaEval or MT-Bench: a claim that holds here is consistent with the "
        "paper's mechanism, a claim that is undecided or reversed here says the mechanism is not enough on its "
        "own in that world, not that the paper's numbers are wrong.", "",
    ]


def _how_to_read(results: dict) -> list[str]:
    """How settings were chosen, and what the columns of the exploratory tables mean."""
    first = next(iter(results["worlds"].values()))
    return [
        "## How the runs were made", "",
        f"- Per world kind: {len(first['tuning_world_seeds'])} tuning world(s) and {first['worlds']} test worlds "
        "with disjoint, consecutive world seeds (tuning first). A world is its own data, teachers (pi_ref, pi_dpo) "
        "and SFT student.",
        "- Tuning: every method's grid (the same number of settings for every method, no extension) is trained in "
        "the tuning world(s) and scored on their validation split by the score declared in the config "
        f"(`search.select_on`: {first['config']['search']['select_on']} reward); the best is trained unchanged in "
        "every test world. Test worlds choose nothing; tuning worlds are never scored for these tables.",
        "- ADPA+ is ADPA started from DCKD's student of the same world and seed (DCKD's chosen setting), so it "
        "trains DCKD's steps and then its own; only its ADPA stage is tuned. `ADPA (400 steps)` is ADPA's chosen "
        "setting trained as many steps as ADPA+ in all: the matched-compute control (not tuned on its own).",
        "- Reward columns: mean ± sd over test worlds (and seeds) of each run's mean reward on the test prompts. "
        "**Δ vs ADPA**: paired difference with its prompt-level bootstrap interval and how many worlds share its "
        "sign. **habit**: share of responses with the filler word (the third world's habit).",
        "",
    ]


def _claims_table(results: dict, questions: bool) -> list[str]:
    lines = ["| claim | ordering | world | greedy: Δ [95% CI] worlds, verdict; world p | "
             "sampled: Δ [95% CI] worlds, verdict; world p |", "|---|---|---|---|---|"]
    for name, world in results["worlds"].items():
        for claim in world["claims"]:
            if claim["question"] != questions:
                continue
            order = f"{claim['better']} vs {claim['worse']}" if questions else f"{claim['better']} > {claim['worse']}"
            cells = [f"{_verdict_cell(claim[m], questions)}; p {_p(claim[m]['world_test']['p_t'])}"
                     for m in ("greedy", "sampled")]
            lines.append(f"| {claim['key']} | {order} | {name} | {cells[0]} | {cells[1]} |")
    return lines


def _search_lines(world: dict) -> list[str]:
    summary = world["search_summary"]
    config = world["config"]
    lines = [
        f"Chosen on tuning world(s) {', '.join(map(str, world['tuning_world_seeds']))} (validation split, "
        f"{config['world']['num_validation']} prompts, score: {config['search']['select_on']} reward, seed 0); "
        f"{summary['settings_trained']} settings trained in all. Rows without a search take another method's "
        f"setting: {', '.join(f'{k} from {v}' for k, v in summary['derived'].items()) or 'none'}.",
        "",
        "| method | grid | settings tried | chosen | validation score of each setting |",
        "|---|---|---|---|---|",
    ]
    for name, s in world["search"].items():
        written = "; ".join(f"{k}: {', '.join(f'{v:g}' if isinstance(v, float) else str(v) for v in vs)}"
                            for k, vs in s["grid"].items())
        scores = ", ".join(f"{_setting({k: v for k, v in t.items() if k != 'reward'})}: {t['reward']:.3f}"
                           for t in s["validation"])
        lines.append(f"| {name} | {written} | {s['settings_tried']} | {_setting(world['methods'][name]['setting'])} "
                     f"| {scores} |")
    return lines


def _method_table(world: dict, names: list[str], habit: bool) -> list[str]:
    head = "| method | setting | steps in all | reward (greedy) | Δ vs ADPA (greedy) | reward (sampled) | Δ vs ADPA (sampled) |"
    rule = "|---|---|---|---|---|---|---|"
    if habit:
        head += " habit (greedy) | habit (sampled) |"
        rule += "---|---|"
    lines = [head, rule]
    for name in names:
        row = world["methods"][name]
        cells = [name, _setting(row.get("setting")), str(row.get("steps") or "-")]
        for mode in ("greedy", "sampled"):
            cells += [_mean_sd(row[f"reward_{mode}"]), _interval(row.get(f"diff_vs_ADPA_{mode}"))]
        if habit:
            cells += [f"{row['habit_greedy']:.2f}", f"{row['habit_sampled']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _world_section(name: str, world: dict) -> list[str]:
    """One world kind: its description and sizes, its table, the search, examples."""
    config = world["config"]
    w = config["world"]
    habit = bool(w["reward"].get("filler"))
    lines = [
        f"## World `{name}`", "",
        world["about"].strip() or "(no description in the config)", "",
        f"Tuning world seed(s) {', '.join(map(str, world['tuning_world_seeds']))}; test world seeds "
        f"{', '.join(map(str, world['world_seeds']))}; {w['num_sft']} demonstrations, {w['num_pairs']} preference "
        f"pairs, {w['num_validation']} validation and {w['num_test']} test prompts per world; tasks "
        f"{', '.join(w['tasks'])} on {w['min_items']}-{w['max_items']} items; teacher {config['teacher']['layers']} "
        f"layers d={config['teacher']['hidden']}, student {config['student']['layers']} layer(s) "
        f"d={config['student']['hidden']}; {config['steps']} steps of {config['batch_size']} records per method "
        f"unless its row says otherwise. Time per tuning world: "
        f"{', '.join(_duration(s) for s in world['seconds_per_tuning_world'])}; per test world: "
        f"{', '.join(_duration(s) for s in world['seconds_per_world'])}.", "",
        *_method_table(world, list(world["methods"]), habit), "",
        "### Tuning", "", *_search_lines(world), "",
        f"### Example greedy responses (test world seed {world['world_seeds'][0]})", "",
    ]
    for row_name, examples in world["examples"].items():
        shown = "; ".join(f"`{e['prompt']}` → `{e['greedy']}`" for e in examples[:2])
        lines.append(f"- {row_name}: {shown}")
    lines.append("")
    return lines


def research_plot(results: dict, path: Path) -> None:
    """One panel per world kind: each primary claim's per-world paired differences (dots), their mean and
    95% t-interval (bar), coloured by verdict."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    worlds = list(results["worlds"])
    fig, axes = plt.subplots(1, len(worlds), figsize=(6 * len(worlds), 5), squeeze=False, sharey=False)
    colors = {"holds": "tab:green", "reversed": "tab:red", "undecided": "tab:gray"}
    for ax, name in zip(axes[0], worlds):
        entries = [e for e in results["primary"] if e["world"] == name]
        for i, e in enumerate(entries):
            jitter = [i + 0.08 * (j - (len(e["per_world"]) - 1) / 2) / max(1, len(e["per_world"]) / 4)
                      for j in range(len(e["per_world"]))]
            ax.scatter(jitter, e["per_world"], s=14, color="black", alpha=0.6, zorder=3)
            ax.errorbar([i + 0.3], [e["mean"]], yerr=[[e["mean"] - e["low"]], [e["high"] - e["mean"]]], fmt="o",
                        color=colors[e["verdict"]], capsize=4, zorder=4)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(entries)), [f"{e['key']}\n{e['better']}\n> {e['worse']}" for e in entries], fontsize=7)
        ax.set_ylabel(f"per-world reward difference ({entries[0]['decoding'] if entries else ''})")
        ax.set_title(f"world '{name}': {len(entries[0]['per_world']) if entries else 0} test worlds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
