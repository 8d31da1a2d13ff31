"""Concurrency benchmark: many small trainers against one teacher, with and without batching across
callers, as `adpa serve` processes and as a Ray Serve application.

    .venv/bin/python bench/concurrency.py                          # every point (about 5 minutes)
    .venv/bin/python bench/concurrency.py --trainers 1,8 --duration 4 --modes standalone   # a quick look

Builds a tiny teacher (seed 1) and reference (seed 2), then for each mode (standalone: an
`adpa serve` teacher; ray: the teacher deployment of services/ray/app.py, one replica) and each
batching setting (with `--reference process` the reference runs in the teacher's process in
both modes; with `separate`, as a second `adpa serve` or a reference deployment), runs N = 1, 2, 4, 8 trainer threads for `--duration` seconds. Each trainer has
its own TeacherClient (its own connection: a separate caller for the fair scheduler) and sends
small ADVANTAGE requests (a few sequences of mixed lengths, top-k support) back to back, like a
trainer without prefetch. Reported per point: scored positions/s, request latency p50/p99, and
the micro-batches that formed in the teacher (requests and sequences per forward, from its
/metrics). Servers get one torch thread each; the trainers run in this process.

JSON goes to stdout (or --out), a table to stderr. Time nothing else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers.utils import logging as hf_logging

from adpa.bench.report import add_out, benchmark_parser, emit, table_line
from adpa.client import TeacherClient
from adpa.protocol import SupportSpec
from adpa.services.launch import ServiceProcess, free_port
from adpa.tiny_model import make_tiny_model


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--trainers", default="1,2,4,8", help="comma-separated numbers of concurrent trainers")
    p.add_argument("--modes", default="standalone,ray", help="comma-separated: standalone, ray")
    p.add_argument("--batching", default="off,on", help="comma-separated: off, on")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per point")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of untimed load before each point")
    p.add_argument("--batch", type=int, default=4, help="sequences per request")
    p.add_argument("--min-len", type=int, default=16, help="shortest sequence (prompt + response)")
    p.add_argument("--max-len", type=int, default=48, help="longest sequence")
    p.add_argument("--k", type=int, default=8, help="top-k of the support")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="the servers' --batch-wait-ms when batching")
    p.add_argument("--deterministic", action="store_true",
                   help="the servers' --deterministic: one sequence per forward, answers independent of companions")
    p.add_argument("--reference", default="process", choices=["process", "separate"],
                   help="process: the reference in the teacher's process (standalone --reference PATH, Ray "
                   "ray_colocate_reference); separate: its own server / deployment")
    add_model_args(p)
    p.add_argument("--workdir", help="where models and logs go (default: a temporary folder)")
    add_out(p)
    return p.parse_args(argv)


def requests_for(args, trainer: int, vocab: int, count: int = 16) -> list[tuple[list[list[int]], list[tuple[int, int]]]]:
    """A trainer's cycle of requests: `batch` sequences of mixed lengths, the second half scored."""
    g = torch.Generator().manual_seed(1000 + trainer)
    out = []
    for _ in range(count):
        lengths = torch.randint(args.min_len, args.max_len + 1, (args.batch,), generator=g).tolist()
        seqs = [torch.randint(7, vocab, (n,), generator=g).tolist() for n in lengths]
        out.append((seqs, [(n // 2, n - 1) for n in lengths]))
    return out


def batch_counters(metrics_url: str) -> dict[str, float]:
    """Sums and counts of the teacher's micro-batch histograms."""
    text = httpx.get(metrics_url, timeout=30).text
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in ("adpa_batch_requests_sum", "adpa_batch_requests_count", "adpa_batch_sequences_sum"):
                values[sample.name] = sample.value
    return values


def run_point(args, endpoint: str, token: str | None, metrics_url: str, trainers: int, vocab: int) -> dict:
    stop = threading.Event()
    measuring = threading.Event()
    latencies: list[float] = []
    positions = [0]
    errors: list[str] = []
    lock = threading.Lock()
    support = SupportSpec("topk", k=args.k)

    def trainer(i: int) -> None:
        cycle = requests_for(args, i, vocab)
        with TeacherClient(endpoint, token=token, timeout=120) as client:
            client.info()
            j = 0
            while not stop.is_set():
                seqs, ranges = cycle[j % len(cycle)]
                j += 1
                started = time.perf_counter()
                try:
                    client.score(seqs, ranges, signal="advantage", support=support)
                except Exception as err:  # noqa: BLE001 - counted and reported
                    errors.append(repr(err))
                    continue
                if measuring.is_set():
                    with lock:
                        latencies.append(time.perf_counter() - started)
                        positions[0] += sum(e - s for s, e in ranges)

    threads = [threading.Thread(target=trainer, args=(i,), daemon=True) for i in range(trainers)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    before = batch_counters(metrics_url)
    measuring.set()
    started = time.perf_counter()
    time.sleep(args.duration)
    measuring.clear()
    elapsed = time.perf_counter() - started
    after = batch_counters(metrics_url)
    stop.set()
    for t in threads:
        t.join(120)
    forwards = after["adpa_batch_requests_count"] - before["adpa_batch_requests_count"]
    ordered = sorted(latencies)
    return {
        "trainers": trainers,
        "requests": len(latencies),
        "errors": len(errors),
        "positions_per_s": positions[0] / elapsed,
        "latency_p50_ms": 1000 * statistics.median(ordered) if ordered else None,
        "latency_p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))] if ordered else None,
        "forwards": forwards,
        # Counted over warm-up's end to the point's end, so slightly wider than the timed window.
        "requests_per_forward": (after["adpa_batch_requests_sum"] - before["adpa_batch_requests_sum"]) / max(forwards, 1),
        "sequences_per_forward": (after["adpa_batch_sequences_sum"] - before["adpa_batch_sequences_sum"]) / max(forwards, 1),
    }


def serve_args(args, batching: bool) -> list[str]:
    return ["--torch-threads", "1", "--max-inflight", str(getattr(args, "max_inflight", 64)),
            "--batching" if batching else "--no-batching", "--batch-wait-ms", str(args.batch_wait_ms),
            *(["--device", args.device] if args.device else []),
            *(["--deterministic"] if getattr(args, "deterministic", False) else []),
            *(["--turn-hold-ms", str(args.turn_hold_ms)] if getattr(args, "turn_hold_ms", None) is not None else [])]


@contextmanager
def standalone(args, work: Path, teacher: Path, reference: Path, batching: bool):
    env = {"OMP_NUM_THREADS": "1"}
    with ExitStack() as stack:
        target = str(reference)
        if args.reference == "separate":
            ref = stack.enter_context(ServiceProcess(
                ["--role", "reference", "--model", str(reference), *serve_args(args, batching)], http=False, env=env,
                log_path=work / "reference.log"))
            target = ref.endpoint
        server = stack.enter_context(ServiceProcess(
            ["--role", "teacher", "--model", str(teacher), "--reference", target, "--beta", "0.1",
             *serve_args(args, batching)], env=env, log_path=work / "teacher.log"))
        yield server.endpoint, None, f"http://127.0.0.1:{server.http_port}/metrics"


@contextmanager
def ray_cluster(work: Path):
    import ray
    from ray import serve

    from adpa.services.ray.app import GRPC_SERVICER_FUNCTIONS

    token = secrets.token_hex(16)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=4,
             _temp_dir=str(work / "ray"), runtime_env={"env_vars": {"ADPA_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1"}})
    try:
        ports = {"grpc": free_port(), "http": free_port()}
        serve.start(http_options={"host": "127.0.0.1", "port": ports["http"]},
                    grpc_options={"port": ports["grpc"], "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
        yield ports, token
    finally:
        serve.shutdown()
        ray.shutdown()


@contextmanager
def ray_app(args, cluster, teacher: Path, reference: Path, batching: bool):
    from ray import serve

    from adpa.services.ray.app import build_app

    ports, token = cluster
    serve.run(build_app({
        "model": str(teacher), "reference": str(reference), "beta": 0.1, "torch_threads": 1,
        "max_inflight": getattr(args, "max_inflight", 64), "batching": batching, "batch_wait_ms": args.batch_wait_ms,
        "ray_cpus_per_replica": 0.5, **({"deterministic": True} if getattr(args, "deterministic", False) else {}),
        "ray_colocate_reference": args.reference == "process",
        **({"device": args.device} if args.device else {}),
        **({"turn_hold_ms": args.turn_hold_ms} if getattr(args, "turn_hold_ms", None) is not None else {}),
        **({"ray_gpus_per_replica": 0.5} if (args.device or "").startswith("cuda") else {}),
    }), name="adpa", route_prefix="/")
    try:
        yield f"grpc://127.0.0.1:{ports['grpc']}", token, f"http://127.0.0.1:{ports['http']}/metrics"
    finally:
        serve.delete("adpa")


def print_table(doc: dict) -> None:
    c = doc["config"]
    model = f"preset {c['preset']}" if c.get("preset") else f"{c['layers']}x{c['hidden']}"
    table_line(f"model {model}, V={doc['vocab_size']}; requests of {c['batch']} sequences of "
               f"{c['min_len']}-{c['max_len']} tokens, ADVANTAGE top-{c['k']}; {c['duration']:.0f} s per point; "
               f"{doc['cpus']} CPUs")
    table_line(f"{'mode':10} {'batching':8} {'trainers':>8} {'pos/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'req/fwd':>8} "
               f"{'seq/fwd':>8} {'errors':>6}")
    for r in doc["points"]:
        table_line(f"{r['mode']:10} {r['batching']:8} {r['trainers']:8d} {r['positions_per_s']:9.0f} "
                   f"{r['latency_p50_ms']:8.1f} {r['latency_p99_ms']:8.1f} {r['requests_per_forward']:8.2f} "
                   f"{r['sequences_per_forward']:8.2f} {r['errors']:6d}")
    for name, value in doc["summary"].items():
        table_line(f"{name}: {value:.2f}")


def summarize(points: list[dict]) -> dict[str, float]:
    at = {(p["mode"], p["batching"], p["trainers"]): p["positions_per_s"] for p in points}
    most = max(p["trainers"] for p in points)
    summary = {}
    for mode in sorted({p["mode"] for p in points}):
        if (mode, "on", most) in at and (mode, "off", most) in at:
            summary[f"{mode}: batching speed-up at {most} trainers"] = at[mode, "on", most] / at[mode, "off", most]
    for batching in ("on", "off"):
        for n in sorted({p["trainers"] for p in points}):
            if ("ray", batching, n) in at and ("standalone", batching, n) in at:
                summary[f"ray / standalone, batching {batching}, {n} trainers"] = (
                    at["ray", batching, n] / at["standalone", batching, n])
    return summary


def bench_models(args, work: Path, max_len: int) -> tuple[Path, Path, int]:
    """The served benchmarks' teacher (seed 1) and reference (seed 2), and their vocabulary size:
    `args.preset`'s shape saved under `args.models_dir` (reused), else tiny models of
    `args.layers` x `args.hidden` under `work` for sequences up to `max_len` tokens."""
    if args.preset:
        from adpa.bench.presets import get_preset, saved_model

        preset, models = get_preset(args.preset), Path(args.models_dir or work)
        device = args.device or "cpu"  # where the random weights are made; the servers load them anyway
        teacher = saved_model(preset, models, seed=1, device=device, dtype="auto")
        reference = saved_model(preset, models, seed=2, device=device, dtype="auto")
        return teacher, reference, preset.vocab
    size = dict(layers=args.layers, hidden=args.hidden, max_seq_len=max(256, max_len))
    teacher = make_tiny_model(work / "teacher", seed=1, **size)
    reference = make_tiny_model(work / "reference", seed=2, **size)
    return teacher, reference, 77


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags `bench_models` reads (and --device, where the servers run)."""
    p.add_argument("--layers", type=int, default=2, help="transformer layers of the tiny models")
    p.add_argument("--hidden", type=int, default=128, help="hidden size of the tiny models")
    p.add_argument("--preset", help="teacher and reference shape of adpa.bench.presets (its vocabulary too) instead "
                   "of --layers/--hidden; saved under --models-dir and reused")
    p.add_argument("--device", help="the servers' device (default: theirs, auto); with cuda, each Ray replica "
                   "reserves half a GPU")
    p.add_argument("--models-dir", help="with --preset: where its checkpoints go (default: --workdir)")


def main(argv=None) -> int:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    trainer_counts = [int(n) for n in args.trainers.split(",")]
    modes = args.modes.split(",")
    unknown = set(modes) - {"standalone", "ray"} | set(args.batching.split(",")) - {"on", "off"}
    if unknown:
        raise SystemExit(f"unknown --modes / --batching value(s): {sorted(unknown)}")
    points = []
    with tempfile.TemporaryDirectory(prefix="adpa-bench-") as tmp:
        work = Path(args.workdir or tmp)
        teacher, reference, vocab = bench_models(args, work, args.max_len)
        for mode in modes:
            with ExitStack() as stack:
                cluster = stack.enter_context(ray_cluster(work)) if mode == "ray" else None
                for batching in args.batching.split(","):
                    on = batching == "on"
                    server = (ray_app(args, cluster, teacher, reference, on) if mode == "ray"
                              else standalone(args, work, teacher, reference, on))
                    with server as (endpoint, token, metrics_url):
                        for n in trainer_counts:
                            point = run_point(args, endpoint, token, metrics_url, n, vocab)
                            points.append({"mode": mode, "batching": batching, **point})
                            table_line(f"{mode} batching={batching} trainers={n}: {point['positions_per_s']:.0f} pos/s")
    doc = {"config": vars(args), "vocab_size": vocab, "cpus": os.cpu_count(), "torch": torch.__version__,
           "points": points, "summary": summarize(points)}
    print_table(doc)
    return emit(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
