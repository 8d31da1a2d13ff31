"""The benchmarks (`adpa.bench`): `adpa bench NAME [--flags]` runs one, `adpa bench --help` lists them.

    adpa bench serving --out serving.json          # = python bench/serving.py --out serving.json
    adpa bench serving --help                      # a benchmark's own flags
    adpa bench plots                               # docs/fidelity.png and docs/memory.png from the JSON files
    bench/gpu_suite.sh --peak-tflops 989 OUT       # every GPU benchmark in one go (see docs/benchmarks.md)

Each benchmark is a module here with a `main(argv) -> int` that prints JSON (stdout or --out) and
a table (stderr); its docstring's first paragraph is its description below. Every module of this
package is one (a new file is runnable at once), but the helpers in NOT_BENCHMARKS. Listing them
reads the docstrings from source, so `adpa bench --help` imports neither torch nor the benchmarks.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import pkgutil
import signal
import sys

# The order `adpa bench --help` lists benchmarks in (others follow, sorted); ALIASES are other names.
BENCHMARKS = ("serving", "fidelity", "step_overhead", "concurrency", "autoscale", "memory", "prefix_sharing", "demo_time",
              "plots")
ALIASES = {"overhead": "step_overhead", "prefix": "prefix_sharing", "plot": "plots", "demo": "demo_time"}
NOT_BENCHMARKS = {"presets"}  # modules here that are helpers, not commands
# Robustness checks with pass/fail and dev-only dependencies, once benchmarks here: not shipped any more.
MOVED = {"fuzz": "robustness/fuzz.py", "soak": "robustness/soak.py"}


def names() -> list[str]:
    """The benchmarks present: the modules of this package but helpers and private ones."""
    found = {m.name for m in pkgutil.iter_modules(__path__)
             if not m.name.startswith("_") and m.name not in NOT_BENCHMARKS}
    return [n for n in BENCHMARKS if n in found] + sorted(found - set(BENCHMARKS))


def description(name: str) -> str:
    """The first paragraph of a benchmark's module docstring, read without importing it."""
    spec = importlib.util.find_spec(f"{__name__}.{name}")
    if spec is None or not spec.origin:
        return "(not in this installation)"
    with open(spec.origin, encoding="utf-8") as fh:
        doc = ast.get_docstring(ast.parse(fh.read())) or ""
    return " ".join(doc.strip().split("\n\n")[0].split())


def usage() -> str:
    from textwrap import fill  # noqa: PLC0415 - only for the listing

    lines = ["usage: adpa bench NAME [--flags]   (adpa bench NAME --help for a benchmark's flags)", "",
             "benchmarks:"]
    for name in names():
        text = fill(description(name), width=100, initial_indent=" " * 18, subsequent_indent=" " * 18)
        lines.append(f"  {name:15} {text.lstrip()}")
    lines += ["", "aliases: " + ", ".join(f"{a} = {n}" for a, n in ALIASES.items()),
              "model presets (random weights, tiny to Llama-3.1-8B-like): --preset of serving and concurrency,",
              "  --teacher-preset of step_overhead (bench/presets.py)",
              "the GPU suite: bench/gpu_suite.sh --peak-tflops TFLOPS OUT_DIR (docs/benchmarks.md)"]
    return "\n".join(lines)


def _terminate(signum, frame) -> None:
    # `timeout` and schedulers stop with SIGTERM: unwind (servers stopped, Ray shut down) instead of dying.
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name = ALIASES.get(argv[0], argv[0]).replace("-", "_")
    if name in MOVED:
        print(f"adpa bench: {name} is a robustness check now, not a benchmark: from a checkout, run "
              f"`python {MOVED[name]}` (`make robustness` runs both briefly)", file=sys.stderr)
        return 2
    if name not in names():
        print(f"adpa bench: unknown benchmark {argv[0]!r}; expected one of {', '.join(names())} "
              f"(or {', '.join(ALIASES)})", file=sys.stderr)
        return 2
    module = importlib.import_module(f"{__name__}.{name}")
    if not callable(getattr(module, "main", None)):
        print(f"adpa bench: {name} has no main(argv) (a helper? list it in NOT_BENCHMARKS)", file=sys.stderr)
        return 2
    sys.argv[0] = f"adpa bench {name}"  # the benchmark's own --help names the command that ran it
    try:
        signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread (called from a test's thread): keep the default
        pass
    return module.main(argv[1:]) or 0
