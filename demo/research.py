"""Replicates that include the world, pre-registered claims decided over worlds, and the rest explored.

    adpa demo --config demo/experiments/paper.yaml --config demo/experiments/credit.yaml \\
        --config demo/experiments/habit.yaml --workdir runs/paper --out docs

For each config (a world kind): `tuning_worlds` worlds (seeds world.seed + t) where every method's grid
is searched on the validation split, and `worlds` test worlds (seeds world.seed + tuning_worlds + r)
where the chosen settings are trained unchanged and scored on the test split. A world has its own
data, stage 0 (teachers and SFT student, training seed = its index) and services. Tuning worlds are
never tested; test worlds never choose anything.

The config's `primary` claims are decided at the world level: the per-world mean difference of the
two methods under the claim's decoding, a paired t-test over test worlds and its t-interval
(adpa.demo.stats.world_test), Holm over every primary claim of every world kind in the run. All the
rest (the other decoding, the paper's other orderings, the matched-compute control, the prompt-level
bootstrap) is exploratory and reported apart.

A world's record is written to `WORKDIR/NAME/{tuning,world}-R/replicate.json` as soon as it is done;
rerunning the command with the same workdir reuses records whose config, seeds and settings match
(the report then says how many were reused, since the wall time no longer covers them).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from adpa.demo.config import DemoConfig
from adpa.demo.pipeline import DemoRun, _slug, write_results
from adpa.demo.provenance import environment, source_state
from adpa.demo.stats import decide, holm, paired_difference, run_means, verdict, win_rate, world_test
from adpa.demo.world import has_filler

logger = logging.getLogger(__name__)

FIXED_ROWS = ("Teacher (DPO)", "Teacher SFT (reference)", "Student (untrained)", "SFT")
BASELINE = "ADPA"
MODES = ("greedy", "sampled")


@dataclass(frozen=True)
class Claim:
    """An ordering the paper reports: `better` beats `worse`."""

    key: str
    better: str
    worse: str
    source: str


# The orderings of the paper's tables (AlpacaEval win rates and MT-Bench in the ICLR 2025 slides).
CLAIMS = (
    Claim("T1.1", "ADPA", "SFT", "Table 1: ADPA above SFT (both datasets)"),
    Claim("T1.2", "ADPA", "DPO", "Table 1: ADPA above DPO"),
    Claim("T1.3", "ADPA", "SimPO", "Table 1: ADPA above SimPO"),
    Claim("T1.4", "ADPA", "VanillaKD", "Table 1: ADPA above VanillaKD"),
    Claim("T1.5", "ADPA", "SeqKD", "Table 1: ADPA above SeqKD"),
    Claim("T1.6", "ADPA", "DCKD", "Table 1: ADPA above DCKD"),
    Claim("T1.7", "ADPA+", "ADPA", "Table 1: ADPA+ (DCKD then ADPA) above ADPA"),
    Claim("T1.8", "DCKD", "DPO", "Table 1: DCKD above DPO"),
    Claim("T1.9", "DCKD", "SFT", "Table 1: DCKD above SFT"),
    Claim("T2.1", "DCKD", "DCKD w/o DPO teacher", "Table 2: the DPO teacher helps DCKD"),
    Claim("T2.2", "DCKD", "DCKD w/o y_l", "Table 2: the dispreferred response helps DCKD"),
    Claim("T2.3", "ADPA", "ADPA w/o reference", "Table 2: the reference (advantage, not log pi_dpo) helps ADPA"),
    Claim("T2.4", "ADPA", "ADPA w/o SFT term", "issue 12's Table 2 list: the SFT term helps ADPA (not in the slides)"),
    Claim("T3.1", "ADPA", "Q-argmax KD", "KD-variants table: ADPA above Q-argmax KD (WR 41.8)"),
    Claim("T3.2", "ADPA", "Q-softmax KD", "KD-variants table: ADPA above Q-softmax KD (WR 28.2)"),
    Claim("T3.3", "Q-argmax KD", "Q-softmax KD", "KD-variants table: Q-argmax KD above Q-softmax KD"),
)
# Questions the paper does not order, measured the same way (no verdict direction expected).
QUESTIONS = (
    Claim("Q0", "ADPA+", "ADPA (400 steps)", "ADPA+ against ADPA trained as many steps in all (matched compute)"),
    Claim("Q1", "ADPA", "ADPA (release preset)", "our ADPA (exact advantage at the union support, floor) vs the release's preset"),
    Claim("Q2", "ADPA online", "ADPA", "fresh student samples every step vs samples drawn once (the paper: offline works)"),
    Claim("Q3", "Teacher (DPO)", "Teacher SFT (reference)", "the world teaches: DPO lifts the teacher over its reference"),
)


def world_seeds(config: DemoConfig, test_worlds: int) -> tuple[list[int], list[int]]:
    """The tuning worlds' seeds and the test worlds' seeds: consecutive from `world.seed`, tuning first,
    so the two never overlap."""
    first, tuning = config.world.seed, config.tuning_worlds
    return [first + t for t in range(tuning)], [first + tuning + r for r in range(test_worlds)]


def tuning_config(config: DemoConfig) -> DemoConfig:
    """The config a tuning world trains: every method with a grid of its own (derived rows, which take
    another method's setting, have nothing to choose there)."""
    return config.model_copy(update={"methods": {n: m for n, m in config.methods.items() if m.settings_from is None}})


def choose_settings(tuning_records: list[dict]) -> dict[str, dict]:
    """Each method's setting: the best mean validation score over the tuning worlds (each world scores the
    same settings; with one tuning world, its own choice). Ties go to the setting tried first."""
    chosen = {}
    for name in tuning_records[0]["search"]:
        scores: dict[str, list] = {}
        for record in tuning_records:
            for tried in record["search"][name]["validation"]:
                setting = {k: v for k, v in tried.items() if k != "reward"}
                scores.setdefault(json.dumps(setting, sort_keys=True), [setting, []])[1].append(tried["reward"])
        chosen[name] = max(scores.values(), key=lambda entry: float(np.mean(entry[1])))[0]
    return chosen


def _fingerprint(config: DemoConfig, replicate: int, seeds: int, settings: dict | None) -> str:
    blob = json.dumps({"config": config.model_dump(mode="json"), "replicate": replicate, "seeds": seeds,
                       "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_replicate(config: DemoConfig, workdir: Path, replicate: int, seeds: int,
                  settings: dict[str, dict] | None) -> dict:
    """Train and score world replicate `replicate` (searching settings when `settings` is None); return
    its record: per-prompt rewards of every row (seeds x prompts, per decoding), settings, search."""
    record_path = workdir / "replicate.json"
    fingerprint = _fingerprint(config, replicate, seeds, settings)
    if record_path.exists():
        record = json.loads(record_path.read_text())
        if record.get("fingerprint") == fingerprint:
            logger.info("%s world %d: reusing %s", config.name, replicate, record_path)
            record["reused"] = True
            return record
    run = DemoRun(config, workdir, replicate=replicate)
    summary = run.run(seeds=seeds, settings=settings)
    write_results(summary, workdir)  # this replicate's own table, as `adpa demo` writes it for one world
    rewards: dict[str, dict[str, list[list[float]]]] = {}
    # The share of responses with the filler habit, per row, decoding and seed (the third world's habit).
    habit = {name: {mode: [float(np.mean([has_filler(r) for r in e.modes[mode].responses])) for e in evals]
                    for mode in MODES} for name, evals in run.evals.items()}
    for name, evals in run.evals.items():
        if name in FIXED_ROWS:  # one model: greedy is deterministic, sampling is redrawn per student seed
            model = run.rows[name]["models"][0]
            sampled = [evals[0].modes["sampled"].rewards]
            sampled += [run.evaluate(model, "test", modes=("sampled",), seed=s).modes["sampled"].rewards
                        for s in range(1, seeds)]
            rewards[name] = {"greedy": [evals[0].modes["greedy"].rewards] * seeds, "sampled": sampled}
        else:
            rewards[name] = {mode: [e.modes[mode].rewards for e in evals] for mode in MODES}
    methods = summary["methods"]
    record = {
        "fingerprint": fingerprint,
        "world": config.name,
        "replicate": replicate,
        "world_seed": run.world.seed,
        "seeds": seeds,
        "seconds": summary["seconds"],
        "settings": {n: r["setting"] for n, r in methods.items() if "setting" in r},
        "search": {n: {"validation": r["validation"], **r["search"]} for n, r in methods.items() if "search" in r},
        "rewards": rewards,
        "habit": habit,
        "steps": {n: config.method_steps(n) for n in config.methods},
        "init_models": {n: r["init_models"] for n, r in methods.items() if r.get("init_models")},
        "examples": {n: r["examples"] for n, r in methods.items()},
        "curves": {n: r["curve"] for n, r in methods.items() if r.get("curve")},
        "reused": False,
    }
    record_path.write_text(json.dumps(record))
    return record


def per_world_difference(better: np.ndarray, worse: np.ndarray) -> np.ndarray:
    """Paired rewards (worlds, seeds, prompts) -> each world's mean difference, better minus worse."""
    return (np.asarray(better, dtype=np.float64) - np.asarray(worse, dtype=np.float64)).mean(axis=(1, 2))


def analyse(config: DemoConfig, records: list[dict], tuning: list[dict]) -> dict:
    """One world kind: its primary claims' world-level tests (Holm comes later, over every kind), and the
    exploratory means, paired differences to ADPA, win rates, orderings and habit rates."""
    names = list(records[0]["rewards"])
    arrays = {n: {m: np.array([r["rewards"][n][m] for r in records]) for m in MODES} for n in names}
    rows = {}
    for name in names:
        row: dict = {"setting": records[0]["settings"].get(name), "steps": records[0]["steps"].get(name)}
        for mode in MODES:
            row[f"reward_{mode}"] = run_means(arrays[name][mode])
            row[f"habit_{mode}"] = float(np.mean([r["habit"][name][mode] for r in records]))
            if BASELINE in arrays and name != BASELINE:
                row[f"diff_vs_{BASELINE}_{mode}"] = paired_difference(arrays[name][mode], arrays[BASELINE][mode]).as_dict()
                row[f"win_rate_vs_{BASELINE}_{mode}"] = win_rate(arrays[name][mode], arrays[BASELINE][mode]).as_dict()
        rows[name] = row
    primary = []
    for claim in config.primary:
        test = world_test(per_world_difference(arrays[claim.better][claim.decoding], arrays[claim.worse][claim.decoding]))
        primary.append({**claim.model_dump(), "world": config.name, **test.as_dict()})
    claims = []
    for claim in (*CLAIMS, *QUESTIONS):
        if claim.better not in arrays or claim.worse not in arrays:
            continue
        entry = {"key": claim.key, "better": claim.better, "worse": claim.worse, "source": claim.source,
                 "question": claim in QUESTIONS}
        for mode in MODES:
            interval = paired_difference(arrays[claim.better][mode], arrays[claim.worse][mode])
            over_worlds = world_test(per_world_difference(arrays[claim.better][mode], arrays[claim.worse][mode]))
            entry[mode] = {**interval.as_dict(), "verdict": verdict(interval), "world_test": over_worlds.as_dict()}
        claims.append(entry)
    search = {name: {"validation": [t for r in tuning for t in r["search"][name]["validation"]],
                     "settings_tried": sum(r["search"][name]["settings_tried"] for r in tuning),
                     "grid": config.methods[name].grid, **{k: v for k, v in tuning[0]["search"][name].items()
                                                           if k not in ("validation", "settings_tried")}}
              for name in tuning[0]["search"]}
    shape = next(iter(arrays.values()))["greedy"].shape
    return {
        "name": config.name,
        "about": config.about,
        "config": config.model_dump(mode="json"),
        "worlds": len(records),
        "seeds": shape[1],
        "prompts": shape[2],
        "tuning_world_seeds": [r["world_seed"] for r in tuning],
        "world_seeds": [r["world_seed"] for r in records],
        "seconds_per_tuning_world": [r["seconds"] for r in tuning],
        "seconds_per_world": [r["seconds"] for r in records],
        "reused_worlds": sum(bool(r.get("reused")) for r in [*tuning, *records]),
        "methods": rows,
        "primary": primary,
        "claims": claims,
        "search": search,
        "search_summary": {
            "methods": len(search),
            "settings_per_method": {n: len(config.methods[n].candidates()) for n in search},
            "settings_trained": sum(s["settings_tried"] for s in search.values()),
            "derived": {n: m.settings_from for n, m in config.methods.items() if m.settings_from},
        },
        "examples": records[0]["examples"],
        "curves": records[0]["curves"],
    }


def decide_primary(worlds: dict[str, dict]) -> list[dict]:
    """Holm over every primary claim of every world kind (one family: the whole pre-registration), then
    each claim's verdict from its adjusted p (adpa.demo.stats.decide). Updates the entries in place."""
    entries = [entry for world in worlds.values() for entry in world["primary"]]
    for entry, adjusted in zip(entries, holm([e["p_t"] for e in entries])):
        entry["p_holm"] = adjusted
        entry["verdict"] = decide(entry["mean"], adjusted)
    return entries


def loadavg() -> str | None:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return None


def run_research(configs: list[DemoConfig], workdir: str | Path, *, worlds: int | None = None,
                 seeds: int | None = None, command: str | None = None) -> dict:
    """Every config's replicates, then the analysis; a JSON-ready record of it all."""
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        raise ValueError(f"configs need distinct names (their `name` field); got {names}")
    workdir = Path(workdir)
    started, load_before, source = time.perf_counter(), loadavg(), source_state()
    results: dict = {"command": command, "load_before": load_before, "worlds": {}}
    # Every kind's tuning worlds first, then the test worlds round-robin over kinds (test world r of every
    # kind before r + 1), so that a run cut short has the same number of worlds in every kind.
    plan = {}
    for config in configs:
        if not config.tuning_worlds:
            raise ValueError(f"{config.name}: research runs choose settings on tuning worlds; set tuning_worlds >= 1")
        folder = workdir / _slug(config.name)
        tuning = []
        for t in range(config.tuning_worlds):
            logger.info("%s: tuning world %d of %d", config.name, t + 1, config.tuning_worlds)
            tuning.append(run_replicate(tuning_config(config), folder / f"tuning-{t}", t, 1, None))
        settings = choose_settings(tuning)
        for name, method in config.methods.items():  # derived rows take their source's choice
            if method.settings_from:
                settings[name] = settings[method.settings_from]
        plan[config.name] = (config, folder, tuning, settings, worlds or config.worlds, seeds or config.seeds, [])
    for r in range(max(p[4] for p in plan.values())):
        for config, folder, _, settings, n_worlds, n_seeds, records in plan.values():
            if r < n_worlds:
                logger.info("%s: test world %d of %d, %d seed(s)", config.name, r + 1, n_worlds, n_seeds)
                records.append(run_replicate(config, folder / f"world-{r}", config.tuning_worlds + r, n_seeds,
                                             settings))
    for name, (config, _, tuning, _, _, _, records) in plan.items():
        results["worlds"][name] = analyse(config, records, tuning)
    results["primary"] = decide_primary(results["worlds"])
    results["preregistration"] = {name: w["config"]["primary"] for name, w in results["worlds"].items()}
    results["seconds"] = round(time.perf_counter() - started, 1)
    results["load_after"] = loadavg()
    results["environment"] = {**environment(), **source}  # the code the run started from
    return results


def write_research(results: dict, out: str | Path) -> None:
    """results.json, results.md and results.png in `out`."""
    from adpa.demo.report import research_markdown, research_plot

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    (out / "results.md").write_text(research_markdown(results))
    research_plot(results, out / "results.png")
