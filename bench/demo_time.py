"""The demo's wall time, as a user meets it, and whether its table changed.

    adpa bench demo                                   # `adpa demo` once (about 4 min on 2 cores)
    adpa bench demo --baseline OLD/results.json       # ... and compare its table with an earlier run's
    adpa bench demo --config small.yaml --repeats 3

Runs `adpa demo` as a new process per repeat (imports, services and workers included, as `make demo`
does), each into a fresh workdir, and reports its wall time, the CPU time of all its processes, and
the load average before and after (other work on the machine slows a run without changing its
numbers). With `--baseline` it compares every repeat's table with that results.json: each method's
chosen setting, mean rewards, win rates, example responses and every loss curve must be equal, bit
for bit (they are on one machine; another CPU or library version changes round-off). JSON on stdout
(or --out), a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from adpa.bench.report import add_out, emit, table_line

# What a table is made of: per method (row), these fields; and the loss curves of every run.
ROW_FIELDS = ("setting", "reward_greedy", "reward_sampled", "win_rate_vs_ADPA_greedy", "win_rate_vs_ADPA_sampled",
              "win_rate_vs_SFT_greedy", "win_rate_vs_SFT_sampled", "examples")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="demo config (default: the built-in demo/default.yaml)")
    p.add_argument("--repeats", type=int, default=1, help="runs, one after the other (default: 1)")
    p.add_argument("--baseline", help="a results.json to compare every run's table with")
    p.add_argument("--workdir", help="keep the runs here (default: a temporary folder, removed)")
    add_out(p)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be at least 1, got {args.repeats}")
    return args


def read_baseline(path: str) -> dict:
    """An `adpa demo` results.json, or a SystemExit that says what is wrong with it."""
    try:
        baseline = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"adpa bench demo: cannot read --baseline {path}: {e}") from None
    if not isinstance(baseline, dict) or not {"methods", "curves"} <= set(baseline):
        raise SystemExit(f"adpa bench demo: --baseline {path} is not an `adpa demo` results.json "
                         "(no 'methods' and 'curves')")
    return baseline


def compare_tables(baseline: dict, results: dict) -> dict:
    """How many table values (ROW_FIELDS of every method, every loss curve) are equal, and which differ."""
    same, differ = 0, []
    for name in sorted(set(baseline["methods"]) | set(results["methods"])):
        old, new = baseline["methods"].get(name), results["methods"].get(name)
        if old is None or new is None:
            differ.append(f"{name}: only in {'the new run' if old is None else 'the baseline'}")
            continue
        for field in ROW_FIELDS:
            if old.get(field) == new.get(field):
                same += 1
            else:
                differ.append(f"{name} {field}: {old.get(field)!r} -> {new.get(field)!r}")
    for label in sorted(set(baseline["curves"]) | set(results["curves"])):
        if baseline["curves"].get(label) == results["curves"].get(label):
            same += 1
        else:
            differ.append(f"curve {label}")
    return {"identical": not differ, "values_equal": same, "differences": differ}


def run_demo(config: str | None, workdir: Path) -> dict:
    command = [sys.executable, "-m", "adpa.cli", "demo", "--workdir", str(workdir)]
    if config:
        command += ["--config", config]
    load_before = os.getloadavg()
    cpu_before = _children_cpu_s()
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    cpu = _children_cpu_s() - cpu_before  # the demo, its workers and services (all waited for)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    results = json.loads((workdir / "results.json").read_text())
    return {"wall_s": round(wall, 1), "cpu_s": round(cpu, 1), "pipeline_s": results["seconds"], "load_before": load_before,
            "load_after": os.getloadavg(), "results": results}


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main(argv=None) -> int:
    args = parse_args(argv)
    baseline = read_baseline(args.baseline) if args.baseline else None
    runs = []
    with tempfile.TemporaryDirectory(prefix="adpa-demo-time-") as tmp:
        root = Path(args.workdir or tmp)
        for repeat in range(args.repeats):
            run = run_demo(args.config, root / f"run-{repeat}")
            results = run.pop("results")
            if baseline is not None:
                run["table"] = compare_tables(baseline, results)
            run["jobs"] = results["config"].get("jobs", 1)
            runs.append(run)
            table_line(f"run {repeat}: {run['wall_s']:.1f} s")
    walls = [r["wall_s"] for r in runs]
    doc = {"benchmark": "demo_time", "config": args.config or "demo/default.yaml", "cores": os.cpu_count(),
           "runs": runs, "wall_s_min": min(walls), "wall_s_median": statistics.median(walls),
           "baseline": args.baseline}
    lines = [f"adpa demo ({doc['config']}), {os.cpu_count()} cores, jobs {runs[0]['jobs']}",
             f"  {'run':>3} {'wall s':>7} {'CPU s':>7} {'pipeline s':>10}  load before       table vs baseline"]
    for i, r in enumerate(runs):
        table = r.get("table")
        verdict = "-" if table is None else (f"identical ({table['values_equal']} values)" if table["identical"]
                                              else f"{len(table['differences'])} differ")
        load = " ".join(f"{x:.2f}" for x in r["load_before"])
        lines.append(f"  {i:>3} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f} {r['pipeline_s']:>10.1f}  {load:<16}  {verdict}")
    table_line("\n".join(lines))
    return emit(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
