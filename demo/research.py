"""Replicates that include the world, and the paper's claims checked against their noise.

    adpa demo --worlds 3 --seeds 2 --config demo/experiments/paper.yaml --config demo/experiments/credit.yaml \\
        --workdir runs/paper --out docs

For each config (a world kind) and each replicate r < worlds: a world built from seed
`world.seed + r`, its own stage 0 (teachers and SFT student, training seed r), its own services,
and every student method trained with seeds 0..seeds-1. Each method's setting is chosen once per
world kind, on replicate 0's validation split (adpa.demo.search, with the config's grid-extension
rule), and then trained unchanged on every replicate; test splits are read only for the final
scores. Every comparison is paired (same world, seed and prompts) with a bootstrap interval over
worlds, seeds and prompts (adpa.demo.stats).

A replicate's record is written to `WORKDIR/NAME/world-R/replicate.json` as soon as it is done;
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
from adpa.demo.stats import paired_difference, run_means, verdict, win_rate

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
    Claim("Q1", "ADPA", "ADPA (release preset)", "our ADPA (exact advantage at the union support, floor) vs the release's preset"),
    Claim("Q2", "ADPA online", "ADPA", "fresh student samples every step vs samples drawn once (the paper: offline works)"),
    Claim("Q3", "Teacher (DPO)", "Teacher SFT (reference)", "the world teaches: DPO lifts the teacher over its reference"),
)


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
        "examples": {n: r["examples"] for n, r in methods.items()},
        "curves": {n: r["curve"] for n, r in methods.items() if r.get("curve")},
        "reused": False,
    }
    record_path.write_text(json.dumps(record))
    return record


def analyse(config: DemoConfig, records: list[dict]) -> dict:
    """Means, paired differences to ADPA, win rates and the claims' verdicts for one world kind."""
    names = list(records[0]["rewards"])
    arrays = {n: {m: np.array([r["rewards"][n][m] for r in records]) for m in MODES} for n in names}
    rows = {}
    for name in names:
        row: dict = {"setting": records[0]["settings"].get(name)}
        for mode in MODES:
            row[f"reward_{mode}"] = run_means(arrays[name][mode])
            if BASELINE in arrays and name != BASELINE:
                row[f"diff_vs_{BASELINE}_{mode}"] = paired_difference(arrays[name][mode], arrays[BASELINE][mode]).as_dict()
                row[f"win_rate_vs_{BASELINE}_{mode}"] = win_rate(arrays[name][mode], arrays[BASELINE][mode]).as_dict()
        rows[name] = row
    claims = []
    for claim in (*CLAIMS, *QUESTIONS):
        if claim.better not in arrays or claim.worse not in arrays:
            continue
        entry = {"key": claim.key, "better": claim.better, "worse": claim.worse, "source": claim.source,
                 "question": claim in QUESTIONS}
        for mode in MODES:
            interval = paired_difference(arrays[claim.better][mode], arrays[claim.worse][mode])
            entry[mode] = {**interval.as_dict(), "verdict": verdict(interval)}
        claims.append(entry)
    search = records[0]["search"]
    shape = next(iter(arrays.values()))["greedy"].shape
    return {
        "name": config.name,
        "about": config.about,
        "config": config.model_dump(mode="json"),
        "worlds": len(records),
        "seeds": shape[1],
        "prompts": shape[2],
        "world_seeds": [r["world_seed"] for r in records],
        "seconds_per_world": [r["seconds"] for r in records],
        "reused_worlds": sum(bool(r.get("reused")) for r in records),
        "methods": rows,
        "claims": claims,
        "search": search,
        "search_summary": {
            "methods": len(search),
            "settings_per_method": sorted({len(config.methods[n].candidates()) for n in search}),
            "methods_extended": sum(bool(s["extensions"]) for s in search.values()),
            "extensions": sum(len(s["extensions"]) for s in search.values()),
            "still_at_edge": sorted(n for n, s in search.items() if s["still_at_edge"]),
            "settings_trained": sum(s["settings_tried"] for s in search.values()),
        },
        "examples": records[0]["examples"],
        "curves": records[0]["curves"],
    }


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
    for config in configs:
        n_worlds, n_seeds = worlds or config.worlds, seeds or config.seeds
        settings, records = None, []
        for replicate in range(n_worlds):
            logger.info("%s: world replicate %d of %d, %d seed(s)", config.name, replicate + 1, n_worlds, n_seeds)
            record = run_replicate(config, workdir / _slug(config.name) / f"world-{replicate}", replicate, n_seeds,
                                   settings)
            if settings is None:
                settings = record["settings"]
            records.append(record)
        results["worlds"][config.name] = analyse(config, records)
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
