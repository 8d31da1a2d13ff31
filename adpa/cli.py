"""The `adpa` command line.

    adpa make-tiny-model runs/tiny/reference --seed 0
    adpa serve --role reference --model runs/tiny/reference --port 50052 --http-port 8082
    adpa serve --role teacher --model runs/tiny/teacher --reference grpc://127.0.0.1:50052
    adpa info grpc://127.0.0.1:50051
    adpa train dckd --model runs/student --dataset prefs.jsonl --teacher grpc://127.0.0.1:50051 --output_dir runs/dckd
    adpa eval --model runs/dckd --prompts test.jsonl --reward mypkg.rewards:score
    adpa demo --seeds 3
    adpa quickstart
    adpa bench serving --out serving.json
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from adpa import __version__
from adpa.config import add_settings_arguments, settings_from_args


@contextlib.contextmanager
def _loading_for_life():
    """Imports what lives as long as the program (torch, transformers, the server stack) with Python's
    cyclic collector off, then freezes it.

    Those imports make about 600,000 objects that the collector tracks, and it ran six full
    collections while they were made: 0.6 s of the 3.5 s of CPU a tiny-model server took to start.
    Frozen, no later collection walks them either. The collector is on again after (unless it was
    off before)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if enabled:
            gc.enable()


def _serve(args: argparse.Namespace) -> int:
    from adpa.services.config import ServeConfig

    try:
        config = settings_from_args(ServeConfig, args)
    except (ValidationError, FileNotFoundError) as err:
        print(f"adpa serve: invalid configuration:\n{err}", file=sys.stderr)
        return 2
    if config.ray:
        with _loading_for_life():
            from adpa.services.ray.launch import check_settings, serve_on_ray

        try:
            check_settings(config)
        except ValueError as err:
            print(f"adpa serve: {err}", file=sys.stderr)
            return 2
        return serve_on_ray(config)
    with _loading_for_life():
        from adpa.services.standalone import serve
    serve(config)
    return 0


def _make_tiny_model(args: argparse.Namespace) -> int:
    from adpa.tiny_model import make_tiny_model

    out = make_tiny_model(
        args.out, layers=args.layers, hidden=args.hidden, heads=args.heads, seed=args.seed,
        init_std=args.init_std, max_seq_len=args.max_seq_len,
    )
    print(f"tiny model written to {out}")
    return 0


def _info(args: argparse.Namespace) -> int:
    import dataclasses

    from adpa.client import TeacherClient

    with TeacherClient(args.endpoint, token=args.token, timeout=args.timeout) as client:
        print(json.dumps(dataclasses.asdict(client.info()), indent=2))
    return 0


def _quickstart(args: argparse.Namespace) -> int:
    from adpa.demo.quickstart import run_quickstart

    return run_quickstart(args.workdir)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _demo(args: argparse.Namespace) -> int:
    import shlex
    import time

    from pydantic import ValidationError

    with _loading_for_life():
        from adpa.demo.config import DemoConfig
        from adpa.demo.pipeline import DemoRun, configure_output, write_results
        from adpa.demo.report import markdown_table

    configure_output()
    configs = []
    for path in args.config or [None]:
        try:
            configs.append(DemoConfig.load(path))
        except (ValidationError, OSError) as err:
            print(f"adpa demo: invalid config {path or '(built-in)'}:\n{err}", file=sys.stderr)
            return 2
    names = [c.name for c in configs]
    if len(set(names)) != len(names):
        print(f"adpa demo: every --config needs its own `name` (got {names})", file=sys.stderr)
        return 2
    out = Path(args.out or args.workdir)
    worlds = [args.worlds or c.worlds for c in configs]
    if len(configs) == 1 and worlds[0] == 1:  # one world: the table of `make demo`
        results = DemoRun(configs[0], args.workdir).run(seeds=args.seeds)
        write_results(results, out)
        print(markdown_table(results))
        print(f"results in {out}/results.json, results.md, results.png ({results['seconds']:.0f}s)")
        return 0
    from adpa.demo.research import run_research, write_research

    command = ["adpa", "demo"]
    for flag in ("worlds", "seeds"):
        if getattr(args, flag):
            command += [f"--{flag}", str(getattr(args, flag))]
    for path in args.config or []:
        command += ["--config", path]
    command += ["--workdir", args.workdir] + (["--out", args.out] if args.out else [])
    started = time.perf_counter()
    results = run_research(configs, args.workdir, worlds=args.worlds, seeds=args.seeds,
                           command=shlex.join(command))
    write_research(results, out)
    print((out / "results.md").read_text())
    print(f"results in {out}/results.json, results.md, results.png ({time.perf_counter() - started:.0f}s)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adpa",
        description="Serve DPO teacher signals over gRPC and distil preference alignment into small models.",
    )
    parser.add_argument("--version", action="version", version=f"adpa {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_serve, _add_make_tiny_model, _add_info, _add_own_parsers, _add_demo, _add_quickstart):
        add(commands)
    return parser


def _add_serve(commands: argparse._SubParsersAction) -> None:
    """`adpa serve`: every setting of ServeConfig is a flag."""
    from adpa.services.config import ServeConfig

    serve = commands.add_parser(
        "serve",
        help="run a teacher or reference scoring service",
        description="Run a teacher (pi_dpo) or reference (pi_ref) scoring service over gRPC, with an HTTP side "
        "for probes and metrics. Settings come from defaults < --config YAML < ADPA_* env < flags.",
    )
    serve.add_argument("--config", help="YAML file with any of the settings below")
    add_settings_arguments(serve, ServeConfig)
    serve.set_defaults(func=_serve)


def _add_make_tiny_model(commands: argparse._SubParsersAction) -> None:
    """`adpa make-tiny-model`."""
    tiny = commands.add_parser(
        "make-tiny-model",
        help="build a tiny random Llama model + word-level tokenizer offline",
        description="Build a tiny random-init Llama-family model and a word-level tokenizer with a chat template, "
        "saved with save_pretrained (for tests and demos without a model hub).",
    )
    tiny.add_argument("out", help="output folder")
    tiny.add_argument("--layers", type=int, default=2, help="transformer layers (default: 2)")
    tiny.add_argument("--hidden", type=int, default=64, help="hidden size (default: 64)")
    tiny.add_argument("--heads", type=int, default=4, help="attention heads (default: 4)")
    tiny.add_argument("--seed", type=int, default=0, help="weight init seed (default: 0)")
    tiny.add_argument("--init-std", type=float, default=0.2, help="weight init std (default: 0.2)")
    tiny.add_argument("--max-seq-len", type=int, default=256, help="max positions (default: 256)")
    tiny.set_defaults(func=_make_tiny_model)


def _add_info(commands: argparse._SubParsersAction) -> None:
    """`adpa info`."""
    info = commands.add_parser("info", help="print a service's model info (the handshake)")
    info.add_argument("endpoint", help="host:port or grpc://host:port")
    info.add_argument("--token", help="bearer token, when the service requires one")
    info.add_argument("--timeout", type=float, default=10.0, help="seconds (default: 10)")
    info.set_defaults(func=_info)


def _add_own_parsers(commands: argparse._SubParsersAction) -> None:
    """train, eval and bench, listed here for the help; `main` hands them their flags unparsed."""
    commands.add_parser(
        "train", help="train a model: sft, dpo, simpo, seqkd, dckd, adpa, adpa-plus, ... (see `adpa train --help`)",
        add_help=False,
    )
    commands.add_parser("eval", help="evaluate a model's responses with a reward (see `adpa eval --help`)",
                        add_help=False)
    commands.add_parser("bench", help="run a benchmark: serving, fidelity, step_overhead, concurrency, memory, ... "
                        "(see `adpa bench --help`)", add_help=False)


def _add_demo(commands: argparse._SubParsersAction) -> None:
    """`adpa demo`."""
    demo = commands.add_parser(
        "demo",
        help="the whole pipeline on the built-in preference world, through the real services",
        description="Build the built-in preference world, train the SFT and DPO teachers and the SFT student,\n"
        "start `adpa serve` for the reference and the teacher, train every student method with signals\n"
        "over gRPC, score all models with the ground-truth reward, and write results.json / results.md /\n"
        "results.png. With --worlds above 1 or several --config files, all of that is repeated per world:\n"
        "settings are chosen on each config's tuning worlds, then trained in its test worlds; the report\n"
        "decides the configs' pre-registered primary claims over test worlds (paired t-test, Holm) and\n"
        "lists the rest as exploratory (adpa.demo.research).",
        epilog="examples:\n"
        "  adpa demo            # the built-in world, one seed: what `make demo` runs\n"
        "  adpa demo --config demo/experiments/paper.yaml --config demo/experiments/credit.yaml \\\n"
        "      --config demo/experiments/habit.yaml --workdir runs/paper --out docs\n"
        "                       # docs/results.md, results.json and results.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--config", action="append", metavar="YAML",
                      help="demo config (default: the built-in adpa/demo/default.yaml); repeat it to run several "
                      "world kinds in one report (each config needs its own `name`)")
    demo.add_argument("--seeds", type=_positive_int, metavar="M",
                      help="student training seeds per method and world (>= 1; default: the config's `seeds`)")
    demo.add_argument("--worlds", type=_positive_int, metavar="N",
                      help="test worlds (>= 1): each redraws the world (seed world.seed + tuning_worlds + r) and "
                      "retrains the teachers and the SFT student; settings are chosen on the config's "
                      "`tuning_worlds` only, which are never tested (default: the config's `worlds`, 1 for the "
                      "built-in)")
    demo.add_argument("--workdir", default="runs/demo", help="where data, models and results go (default: %(default)s)")
    demo.add_argument("--out", metavar="DIR",
                      help="where results.json, results.md and results.png go (default: the workdir)")
    demo.set_defaults(func=_demo)


def _add_quickstart(commands: argparse._SubParsersAction) -> None:
    """`adpa quickstart`."""
    quick = commands.add_parser(
        "quickstart",
        help="start a tiny teacher and reference as services and query them (about 20 s)",
        description="Build tiny models, start `adpa serve` for a reference and a teacher on free loopback ports, "
        "fetch log-probs and advantages with the Python client, print them, and stop the services.",
    )
    quick.add_argument("--workdir", default="runs/quickstart", help="where models are written (default: %(default)s)")
    quick.set_defaults(func=_quickstart)

def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # train and eval parse their own flags (from the trainers' config dataclasses).
    if argv and argv[0] in ("train", "eval"):
        with _loading_for_life():
            from adpa.training.cli import eval_main, train_main

        return (train_main if argv[0] == "train" else eval_main)(argv[1:])
    if argv and argv[0] == "bench":  # each benchmark parses its own flags
        from adpa.bench import main as bench_main

        return bench_main(argv[1:])
    with _loading_for_life():  # the parser imports torch (serve's settings)
        parser = build_parser()
    args = parser.parse_args(argv)
    return args.func(args)


def run() -> None:
    """The `adpa` program (console script and `python -m adpa.cli`): main(), then exit.

    gc.freeze() first: Python's last full collection at exit walks every object that torch and
    transformers created, about a second of CPU after a server has already stopped. Nothing needs
    it: logging and coverage write from atexit handlers, which run before it."""
    code = main()
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
