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

Also per point: the CPU time per request of every process that serves it (user + system, from
/proc: the server, or Ray's proxy, replicas, controller, raylet and GCS, and the trainers), and
at 1 trainer where a request's time goes (`hops`: the trainer's latency, Serve's access-log times
at the proxy and the replica, the front end's own time). `ray` starts Ray with the Serve settings
of `adpa serve --ray` (SERVE_ENV), `ray-plain` with Serve's defaults; `--py-spy` samples the
server, the proxy and the replica at the first --trainers point (docs/benchmarks.md, "Ray
Serve's hops").

JSON goes to stdout (or --out), a table to stderr. Time nothing else on the machine meanwhile.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import psutil
import torch
from prometheus_client.parser import text_string_to_metric_families
from transformers.utils import logging as hf_logging

from adpa.bench.report import add_out, benchmark_parser, comma_choices, emit, table_line
from adpa.client import TeacherClient
from adpa.protocol import SupportSpec
from adpa.services.launch import ServiceProcess, free_port
from adpa.tiny_model import make_tiny_model


def add_request_arguments(p: argparse.ArgumentParser) -> None:
    """The shape of the trainers' requests (`requests_for`)."""
    p.add_argument("--batch", type=int, default=4, help="sequences per request")
    p.add_argument("--min-len", type=int, default=16, help="shortest sequence (prompt + response)")
    p.add_argument("--max-len", type=int, default=48, help="longest sequence")
    p.add_argument("--k", type=int, default=8, help="top-k of the support")


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--trainers", default="1,2,4,8", help="comma-separated numbers of concurrent trainers")
    p.add_argument("--modes", default="standalone,ray", help="comma-separated: standalone, ray (with the Serve "
                   "settings of `adpa serve --ray`, SERVE_ENV of services/ray/launch.py), ray-plain (Serve's defaults)")
    p.add_argument("--batching", default="off,on", help="comma-separated: off, on")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load per point")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of untimed load before each point")
    add_request_arguments(p)
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="the servers' --batch-wait-ms when batching")
    p.add_argument("--deterministic", action="store_true",
                   help="the servers' --deterministic: one sequence per forward, answers independent of companions")
    p.add_argument("--reference", default="process", choices=["process", "separate"],
                   help="process: the reference in the teacher's process (standalone --reference PATH, Ray "
                   "ray_colocate_reference); separate: its own server / deployment")
    add_model_args(p)
    p.add_argument("--workdir", help="where models and logs go (default: a temporary folder)")
    p.add_argument("--py-spy", action="store_true", help="sample the server (standalone), Serve's proxy and the "
                   "teacher replica (ray) with py-spy (the dev extra) at the first --trainers point; stacks "
                   "under --workdir (or here)")
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
            elif (sample.name in ("adpa_request_seconds_sum", "adpa_request_seconds_count")
                  and sample.labels.get("method") == "Score"):
                values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def process_groups(mode: str, server_pids: list[int]) -> dict[str, list[psutil.Process]]:
    """The processes that serve a point, by role: the trainers (this process), the server(s) of the
    standalone mode, or Ray's proxy, replicas, controller and core processes (this process's
    descendants: a local Ray started here)."""
    groups: dict[str, list[psutil.Process]] = {"trainers (this process)": [psutil.Process()]}
    if mode == "standalone":
        groups["adpa serve"] = [psutil.Process(pid) for pid in server_pids]
        return groups
    for proc in psutil.Process().children(recursive=True):
        try:
            line = " ".join(proc.cmdline())
        except psutil.Error:
            continue
        role = ("serve proxy" if "ProxyActor" in line else "serve replica" if "ServeReplica" in line
                else "serve controller" if "ServeController" in line
                else "raylet + gcs" if ("raylet" in line or "gcs_server" in line) else "other ray")
        groups.setdefault(role, []).append(proc)
    return groups


def cpu_seconds(groups: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """User + system CPU seconds used so far by each group (all threads of its processes)."""
    out = {}
    for role, procs in groups.items():
        total = 0.0
        for proc in procs:
            try:
                times = proc.cpu_times()
                total += times.user + times.system
            except psutil.Error:  # a worker that exited: its time is lost to the count
                pass
        out[role] = total
    return out


class ServeLogs:
    """Serve's access logs of a local Ray: each call's latency as the gRPC proxy saw it (receiving the
    call to sending the answer) and as the replica saw it (its method), paired by request id."""

    PROXY = re.compile(r" (\S+) -- /adpa\.v1\.Scorer/Score \S+ OK ([\d.]+)ms")
    REPLICA = re.compile(r" (\S+) -- CALL \S+ OK ([\d.]+)ms")

    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.offsets: dict[str, int] = {}

    def _read_new(self, pattern: str) -> str:
        text = ""
        for path in glob.glob(str(self.log_dir / pattern)):
            path = os.path.realpath(path)  # session_latest moves to each new Ray session
            with open(path, encoding="utf-8", errors="replace") as fh:
                fh.seek(self.offsets.get(path, 0))
                text += fh.read()
                self.offsets[path] = fh.tell()
        return text

    def mark(self) -> None:
        """Skip what is logged so far."""
        self._read_new("proxy_*.log")
        self._read_new("replica_adpa_teacher_*.log")

    def since_mark(self) -> dict[str, float]:
        """Mean proxy and replica milliseconds of the calls logged since `mark` (both sides seen)."""
        proxy = dict(self.PROXY.findall(self._read_new("proxy_*.log")))
        replica = dict(self.REPLICA.findall(self._read_new("replica_adpa_teacher_*.log")))
        both = [k for k in proxy if k in replica]
        if not both:
            return {}
        return {"calls": len(both), "proxy_ms": statistics.fmean(float(proxy[k]) for k in both),
                "replica_ms": statistics.fmean(float(replica[k]) for k in both)}


def hops(point: dict, serve_logs: dict[str, float] | None) -> dict[str, float]:
    """A request's mean wall time split at each hop, in ms: what the trainer saw, less what the next
    hop saw. Standalone: gRPC (client and server) around the front end. Ray: gRPC to Serve's proxy
    and the proxy's own work; the proxy's router and the call to the replica actor (serialisation
    both ways); Serve's replica wrapper; the front end (admission, decode, forward, encode)."""
    client, front = point["latency_mean_ms"], 1000 * point["server_seconds_per_request"]
    if serve_logs is None:
        return {"grpc (client and server)": client - front, "front end": front}
    if not serve_logs:  # no call in both logs
        return {}
    proxy, replica = serve_logs["proxy_ms"], serve_logs["replica_ms"]
    return {"grpc to the proxy, proxy": client - proxy, "router + actor call to the replica": proxy - replica,
            "replica wrapper": replica - front, "front end": front}


# Where a sampled stack spends its time, by the first pattern that matches it (the innermost
# frames decide: a stack ending in pickle is serialisation whoever called it).
CATEGORIES = [
    # py-spy (--nonblocking) also samples threads parked in a wait: not CPU, left out of the shares.
    ("waiting", re.compile(r"^(Condition\.wait|Event\.wait|EpollSelector\.select|sleep|_worker|Queue\.get|"
                           r"Thread\.join|_wait_for_tstate_lock) \(")),
    ("serialisation (pickle, protobuf, Ray's serializer)", re.compile(
        r"pickle|serializ|SerializeToString|ParseFromString|FromString|_pb2|codec\.py|cloudpickle", re.I)),
    ("forward and signals (torch, engine)",
     re.compile(r"torch|engine\.py|scoring\.py|signals|batching\.py|transformers")),
    ("Serve's router and handles", re.compile(r"router|request_router|handle\.py|replica_scheduler|long_poll")),
    ("Serve's proxy and replica wrappers", re.compile(r"serve/_private/(proxy|replica|grpc_util|proxy_request)")),
    ("gRPC", re.compile(r"grpc", re.I)),
    ("Ray core (actor calls, object store)", re.compile(r"ray/_raylet|_private/worker|ray/_private")),
    ("event loop and thread hand-offs", re.compile(r"asyncio|concurrent/futures|selectors|^(Condition|Lock|Event)\.")),
    # A thread's run() innermost: native code (gRPC's core, torch's kernels) below Python.
    ("native code under Thread.run", re.compile(r"threading")),
]


def stack_shares(collapsed: str) -> dict[str, float]:
    """Shares of py-spy's busy samples (collapsed stacks, `--format raw`) by CATEGORIES, innermost
    frame first (the rest is "other"); "waiting" samples are left out of the shares, and reported
    as "waiting (left out)", their share of all samples."""
    counts: dict[str, float] = {}
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        frames = stack.split(";")[::-1]
        if CATEGORIES[0][1].search(frames[0]):
            name = "waiting"
        else:
            name = next((label for frame in frames for label, pattern in CATEGORIES[1:] if pattern.search(frame)),
                        "other")
        counts[name] = counts.get(name, 0) + int(n)
    waiting = counts.pop("waiting", 0)
    busy = sum(counts.values())
    if not busy:
        return {}
    shares = {k: v / busy for k, v in sorted(counts.items(), key=lambda kv: -kv[1])}
    return {**shares, "waiting (left out)": waiting / (busy + waiting)}


@contextmanager
def sampled(groups: dict[str, list[psutil.Process]], roles: list[str], seconds: float, out_dir: Path):
    """py-spy (the dev extra) on the processes of `roles` for `seconds` (CPU samples only, not idle
    ones); yields a dict filled on exit with each role's shares by CATEGORIES."""
    import shutil
    import subprocess

    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    runs = []
    for role in roles:
        for proc in groups.get(role, []):
            path = out_dir / f"py-spy-{role.replace(' ', '_')}-{proc.pid}.txt"
            runs.append((role, path, subprocess.Popen(
                [spy, "record", "--pid", str(proc.pid), "--duration", str(int(seconds)), "--rate", "200",
                 "--format", "raw", "--nonblocking", "--output", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)))
    shares: dict[str, dict[str, float]] = {}
    try:
        yield shares
    finally:
        for role, path, run in runs:
            try:
                run.wait(seconds + 30)
            except subprocess.TimeoutExpired:
                run.kill()
                run.wait()
            if path.exists():
                shares[role] = stack_shares(path.read_text())


def closed_loop(endpoint: str, token: str | None, cycle: list, stop: threading.Event, support: SupportSpec,
                errors: list[str], timeout: float = 120) -> Iterator[tuple[float, float, list[tuple[int, int]]]]:
    """A trainer: the requests of `cycle` one after the other, each sent once the last is answered, on
    a connection of its own, until `stop`. Yields (sent, answered, ranges) per answer (perf_counter
    seconds); a failed request goes to `errors` and the loop goes on."""
    with TeacherClient(endpoint, token=token, timeout=timeout) as client:
        client.info()
        j = 0
        while not stop.is_set():
            seqs, ranges = cycle[j % len(cycle)]
            j += 1
            sent = time.perf_counter()
            try:
                client.score(seqs, ranges, signal="advantage", support=support)
            except Exception as err:  # noqa: BLE001 - counted and reported
                errors.append(repr(err))
                continue
            yield sent, time.perf_counter(), ranges


def run_point(args, endpoint: str, token: str | None, metrics_url: str, trainers: int, vocab: int,
              groups: dict[str, list[psutil.Process]] | None = None, profile_roles: list[str] | None = None,
              serve_logs: ServeLogs | None = None) -> dict:
    stop = threading.Event()
    measuring = threading.Event()
    latencies: list[float] = []
    positions = [0]
    errors: list[str] = []
    lock = threading.Lock()
    support = SupportSpec("topk", k=args.k)

    def trainer(i: int) -> None:
        for sent, answered, ranges in closed_loop(endpoint, token, requests_for(args, i, vocab), stop, support,
                                                  errors):
            if measuring.is_set():
                with lock:
                    latencies.append(answered - sent)
                    positions[0] += sum(e - s for s, e in ranges)

    threads = [threading.Thread(target=trainer, args=(i,), daemon=True) for i in range(trainers)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    if serve_logs:
        serve_logs.mark()
    before = batch_counters(metrics_url)
    cpu_before = cpu_seconds(groups or {})
    load_before = os.getloadavg()[0]
    profile: dict[str, dict[str, float]] = {}
    with ExitStack() as spying:
        if profile_roles and groups:
            profile = spying.enter_context(sampled(groups, profile_roles, args.duration, Path(args.workdir or ".")))
        measuring.set()
        started = time.perf_counter()
        time.sleep(args.duration)
        measuring.clear()
        elapsed = time.perf_counter() - started
        cpu_after = cpu_seconds(groups or {})
        after = batch_counters(metrics_url)
        logged = serve_logs.since_mark() if serve_logs else None
    stop.set()
    for t in threads:
        t.join(120)
    forwards = after["adpa_batch_requests_count"] - before["adpa_batch_requests_count"]
    ordered = sorted(latencies)
    answered = max(len(latencies), 1)
    point = {
        "py_spy_shares": profile,
        # CPU time per answered request of each process group over the timed window: what a request
        # costs whatever else runs on the machine (throughput on shared cores is CPU / this).
        "cpu_ms_per_request": {role: 1000 * (cpu_after[role] - cpu_before[role]) / answered for role in cpu_after},
        "server_seconds_per_request": (after.get("adpa_request_seconds_sum", 0)
                                       - before.get("adpa_request_seconds_sum", 0))
        / max(after.get("adpa_request_seconds_count", 0) - before.get("adpa_request_seconds_count", 0), 1),
        "latency_mean_ms": 1000 * statistics.fmean(ordered) if ordered else None,
        "load_average": [load_before, os.getloadavg()[0]],
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
    # One request at a time only: with several in flight, queueing at each hop makes the means of
    # the different logs' windows not subtract.
    point["hops_ms"] = hops(point, logged) if trainers == 1 and ordered else {}
    return point


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
        pids = [server.proc.pid] + ([ref.proc.pid] if args.reference == "separate" else [])
        yield server.endpoint, None, f"http://127.0.0.1:{server.http_port}/metrics", pids


@contextmanager
def serve_settings(plain: bool):
    """The environment a local Ray starts with: `adpa serve --ray`'s (SERVE_ENV), or with `plain`
    Serve's own defaults; restored after."""
    from adpa.services.ray.launch import SERVE_ENV

    saved = {name: os.environ.get(name) for name in SERVE_ENV}
    for name, value in SERVE_ENV.items():
        if plain:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def ray_cluster(work: Path, plain: bool = False):
    import ray
    from ray import serve

    from adpa.services.ray.app import GRPC_SERVICER_FUNCTIONS

    token = secrets.token_hex(16)
    with serve_settings(plain):  # read by Ray's processes as they start
        ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=4, _temp_dir=str(work / "ray"),
                 runtime_env={"env_vars": {"ADPA_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1"}})
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
        yield f"grpc://127.0.0.1:{ports['grpc']}", token, f"http://127.0.0.1:{ports['http']}/metrics", []
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
    table_line()
    table_line("where a request's time goes (mean ms; the hops of `hops`) and the CPU it costs (ms per request):")
    for r in doc["points"]:
        split = ", ".join(f"{k} {v:.1f}" for k, v in r["hops_ms"].items()) or "(hops: 1 trainer only)"
        cpu = ", ".join(f"{k} {v:.1f}" for k, v in r["cpu_ms_per_request"].items())
        total = sum(r["cpu_ms_per_request"].values())
        load = r["load_average"]
        table_line(f"{r['mode']:10} {r['batching']:3} {r['trainers']:2d}: {split} | CPU {total:.1f} ({cpu}) | "
                   f"load {load[0]:.1f}->{load[1]:.1f}")
    for r in doc["points"]:
        for role, shares in r.get("py_spy_shares", {}).items():
            table_line(f"py-spy {r['mode']} {r['trainers']} trainers, {role}: "
                       + ", ".join(f"{k} {100 * v:.0f}%" for k, v in shares.items()))
    for name, value in doc["summary"].items():
        table_line(f"{name}: {value:.2f}")


def summarize(points: list[dict]) -> dict[str, float]:
    at = {(p["mode"], p["batching"], p["trainers"]): p["positions_per_s"] for p in points}
    most = max(p["trainers"] for p in points)
    summary = {}
    for mode in sorted({p["mode"] for p in points}):
        if (mode, "on", most) in at and (mode, "off", most) in at:
            summary[f"{mode}: batching speed-up at {most} trainers"] = at[mode, "on", most] / at[mode, "off", most]
    for ray_mode in ("ray", "ray-plain"):
        for batching in ("on", "off"):
            for n in sorted({p["trainers"] for p in points}):
                if (ray_mode, batching, n) in at and ("standalone", batching, n) in at:
                    summary[f"{ray_mode} / standalone, batching {batching}, {n} trainers"] = (
                        at[ray_mode, batching, n] / at["standalone", batching, n])
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
    modes = comma_choices(args.modes, ("standalone", "ray", "ray-plain"), "--modes")
    batchings = comma_choices(args.batching, ("on", "off"), "--batching")
    points = []
    with tempfile.TemporaryDirectory(prefix="adpa-bench-") as tmp:
        work = Path(args.workdir or tmp)
        teacher, reference, vocab = bench_models(args, work, args.max_len)
        for mode in modes:
            with ExitStack() as stack:
                on_ray = mode.startswith("ray")
                cluster = stack.enter_context(ray_cluster(work, plain=mode == "ray-plain")) if on_ray else None
                for batching in batchings:
                    on = batching == "on"
                    server = (ray_app(args, cluster, teacher, reference, on) if on_ray
                              else standalone(args, work, teacher, reference, on))
                    with server as (endpoint, token, metrics_url, pids):
                        logs = ServeLogs(work / "ray" / "session_latest" / "logs" / "serve") if on_ray else None
                        for n in trainer_counts:
                            roles = ((["serve proxy", "serve replica"] if on_ray else ["adpa serve"])
                                     if args.py_spy and n == trainer_counts[0] else None)
                            point = run_point(args, endpoint, token, metrics_url, n, vocab, process_groups(mode, pids),
                                              roles, logs)
                            points.append({"mode": mode, "batching": batching, **point})
                            table_line(f"{mode} batching={batching} trainers={n}: {point['positions_per_s']:.0f} pos/s")
    doc = {"config": vars(args), "vocab_size": vocab, "cpus": os.cpu_count(), "torch": torch.__version__,
           "points": points, "summary": summarize(points)}
    print_table(doc)
    return emit(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
