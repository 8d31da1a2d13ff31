"""Autoscaling benchmark: trainers join a Ray Serve teacher one by one and then leave; the replicas
follow them up and down, and every request is answered exactly once.

    adpa bench autoscale --out docs/bench-runs/autoscale_last_run.json    # about 3 minutes
    adpa bench autoscale --trainers 2 --step 12 --tail 12                  # a quicker look

Builds a tiny teacher (seed 1) and reference (seed 2) and deploys services/ray/app.py on a local
Ray of `--cpus` logical CPUs (Serve set up as `adpa serve --ray` does, SERVE_ENV), the reference
in every teacher replica, each replica reserving `--cpus-per-replica` (0.5: two replicas on two
cores), with ray_autoscale `--autoscale`, a target of `--target` ongoing requests per replica and
short metric periods and delays. Trainers 1..N
join every `--step` seconds, hold for a step, and leave one by one at the same pace; each sends
ADVANTAGE requests back to back (no retries, so a failure is seen as one) with its own request
id, also sent as Serve's request_id metadata. Recorded: the teacher's replicas over time
(serve.status() every `--poll` seconds), every request's outcome and the answered request id,
per-trainer positions/s in each phase, and how many times each request id ran on a replica (the
replicas' access logs): 0 failed and 0 duplicated requests is the pass line. Each of Serve's
scaling decisions (its controller's log) is timed from the trainer join (leave) before it, and to
serve.status() showing the new replica RUNNING (the old one gone): "load to ready" = join to
decision (metric periods and upscale delay) + decision to ready (a Ray worker, models loaded).

JSON goes to stdout (or --out), a table to stderr.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import secrets
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import grpc
import torch
from transformers.utils import logging as hf_logging

from adpa import codec
from adpa.bench.concurrency import add_model_args, add_request_arguments, bench_models, requests_for, serve_settings
from adpa.bench.report import add_out, benchmark_parser, emit, table_line
from adpa.protocol import ScoreQuery, SupportSpec
from adpa.services.launch import free_port
from adpa.v1 import scoring_pb2_grpc


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--trainers", type=int, default=4, help="trainers that join one by one, then leave")
    p.add_argument("--step", type=float, default=20.0, help="seconds between joins (and between leaves)")
    p.add_argument("--tail", type=float, default=20.0, help="seconds watched after the last trainer left")
    p.add_argument("--autoscale", default="1:3", help="the application's ray_autoscale, MIN:MAX teacher replicas")
    p.add_argument("--target", type=float, default=1.2, help="target ongoing requests per replica (a trainer "
                   "without prefetch keeps about 1 request ongoing: 1.2 gives each trainer a replica up to MAX)")
    p.add_argument("--upscale-delay", type=float, default=2.0, help="ray_upscale_delay_s")
    p.add_argument("--downscale-delay", type=float, default=6.0, help="ray_downscale_delay_s")
    p.add_argument("--metrics-period", type=float, default=0.5, help="ray_autoscale_metrics_s")
    p.add_argument("--cpus", type=float, default=2, help="the local Ray's logical CPUs")
    p.add_argument("--cpus-per-replica", type=float, default=0.5, help="ray_cpus_per_replica")
    p.add_argument("--poll", type=float, default=0.25, help="seconds between serve.status() samples")
    add_request_arguments(p)
    add_model_args(p)
    p.add_argument("--workdir", help="where models and Ray's logs go (default: a temporary folder)")
    p.add_argument("--all-requests", action="store_true", help="keep every request's record in the JSON "
                   "(megabytes; by default, counts per trainer)")
    add_out(p)
    return p.parse_args(argv)


def schedule(args: argparse.Namespace) -> list[tuple[float, float]]:
    """(join, leave) seconds of each trainer: joins every step, all held for a step, leaves in turn."""
    n, step = args.trainers, args.step
    return [(i * step, (n + i) * step) for i in range(n)]


class Recorder:
    """Every request's outcome, from every trainer thread."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[dict] = []

    def add(self, **record) -> None:
        with self.lock:
            self.requests.append(record)


def run_trainer(index: int, args: argparse.Namespace, target: str, token: str, vocab: int, t0: float,
                join: float, leave: float, recorder: Recorder) -> None:
    """One trainer from `join` to `leave` (seconds after t0): requests back to back on its own channel."""
    time.sleep(max(0.0, t0 + join - time.monotonic()))
    cycle = requests_for(args, index, vocab)
    support = SupportSpec("topk", k=args.k)
    with grpc.insecure_channel(target) as channel:
        stub = scoring_pb2_grpc.ScorerStub(channel)
        j = 0
        while time.monotonic() - t0 < leave:
            seqs, ranges = cycle[j % len(cycle)]
            request_id = f"t{index}-{j}-{secrets.token_hex(3)}"
            j += 1
            query = ScoreQuery(sequences=[torch.tensor(s) for s in seqs], ranges=ranges, signal="advantage",
                               support=support, request_id=request_id)
            metadata = (("authorization", f"Bearer {token}"), ("request_id", request_id))
            started = time.monotonic()
            outcome, answered, replica = "ok", None, None
            try:
                response = stub.Score(codec.query_to_pb(query), metadata=metadata, timeout=60)
                answered, replica = response.request_id, response.replica
            except grpc.RpcError as err:
                outcome = err.code().name
            recorder.add(trainer=index, request_id=request_id, start=started - t0, end=time.monotonic() - t0,
                         outcome=outcome, answered_id=answered, replica=replica,
                         positions=sum(e - s for s, e in ranges))


def watch_replicas(stop: threading.Event, t0: float, period: float, samples: list[dict]) -> None:
    """The teacher deployment's replicas by state, from serve.status(), until `stop`."""
    from ray import serve

    while not stop.wait(period):
        try:
            app = serve.status().applications.get("adpa")
        except Exception:  # noqa: BLE001 - a sample missed while the controller is busy
            continue
        if app is None or "teacher" not in app.deployments:
            continue
        deployment = app.deployments["teacher"]
        states = {str(getattr(k, "value", k)): v for k, v in deployment.replica_states.items()}
        samples.append({"t": time.monotonic() - t0, "running": states.get("RUNNING", 0),
                        "starting": states.get("STARTING", 0) + states.get("PENDING_ALLOCATION", 0),
                        "stopping": states.get("STOPPING", 0), "status": str(getattr(deployment.status, "value",
                                                                                       deployment.status))})


def executions(log_dir: Path, request_ids: set[str]) -> Counter:
    """How many times each request id ran on a teacher replica: Serve's access log lines (one per
    call answered by a replica, with the request_id metadata the trainer sent)."""
    seen: Counter = Counter()
    pattern = re.compile(r"\b(t\d+-\d+-[0-9a-f]{6})\b")
    for path in glob.glob(str(log_dir / "replica_adpa_teacher_*.log")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if " CALL " not in line:  # "<request_id> -- CALL <route> OK 12.3ms"
                    continue
                for request_id in set(pattern.findall(line)):
                    if request_id in request_ids:
                        seen[request_id] += 1
    return seen


def trainers_at(t: float, plan: list[tuple[float, float]]) -> int:
    return sum(join <= t < leave for join, leave in plan)


DECISION = re.compile(r"^INFO (\S+ \S+) controller \d+ -- (Up|Down)scaling Deployment\(name='teacher'.*? from (\d+) "
                      r"to (\d+) replicas\. Current ongoing requests: ([\d.]+)")


def decisions(log_dir: Path, wall_t0: float) -> list[dict]:
    """Serve's autoscaling decisions for the teacher, from its controller's log: when (seconds after
    wall_t0), from and to how many replicas, and the ongoing requests it saw."""
    out = []
    for path in glob.glob(str(log_dir / "controller_*.log")):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if m := DECISION.match(line):
                    when = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp() - wall_t0
                    out.append({"t": when, "direction": m[2].lower(), "from": int(m[3]), "to": int(m[4]),
                                "ongoing_requests": float(m[5])})
    return sorted(out, key=lambda d: d["t"])


def scalings(found: list[dict], samples: list[dict], plan: list[tuple[float, float]]) -> list[dict]:
    """Each decision with the trainer join (upscale) or leave (downscale) before it and the moment
    serve.status() showed its replicas RUNNING (upscale) or gone (downscale)."""
    out = []
    for d in found:
        up = d["direction"] == "up"
        moments = [join if up else leave for join, leave in plan]
        cause = max((t for t in moments if t <= d["t"]), default=None)
        done = next((s["t"] for s in samples if s["t"] >= d["t"] and
                     (s["running"] >= d["to"] if up else s["running"] + s["stopping"] <= d["to"])), None)
        out.append({**d, "trainers": trainers_at(d["t"], plan), "cause_t": cause, "done_t": done,
                    "load_to_decision_s": None if cause is None else d["t"] - cause,
                    "decision_to_done_s": None if done is None else done - d["t"],
                    "load_to_done_s": None if cause is None or done is None else done - cause})
    return out


def phases(plan: list[tuple[float, float]], end: float, samples: list[dict], requests: list[dict]) -> list[dict]:
    """Between consecutive joins / leaves: trainers, replicas seen, each active trainer's positions/s."""
    cuts = sorted({0.0, end, *(t for pair in plan for t in pair)})
    out = []
    for lo, hi in zip(cuts, cuts[1:], strict=False):
        active = [i for i, (join, leave) in enumerate(plan) if join <= lo and hi <= leave]
        seen = [s["running"] for s in samples if lo <= s["t"] < hi]
        per_trainer = {}
        for i in active:
            done = [r for r in requests if r["trainer"] == i and r["outcome"] == "ok" and lo <= r["end"] < hi]
            per_trainer[str(i)] = sum(r["positions"] for r in done) / (hi - lo)
        out.append({"from_s": lo, "to_s": hi, "trainers": len(active),
                    "replicas_min": min(seen, default=None), "replicas_max": max(seen, default=None),
                    "replicas_at_end": seen[-1] if seen else None, "positions_per_s": per_trainer})
    return out


def compact(doc: dict, keep_requests: bool) -> dict:
    """The document of record: per-trainer request counts instead of every request (unless
    `keep_requests`), and the replica samples where a count changed."""
    requests = doc["requests"]
    per_trainer = {}
    for i in sorted({r["trainer"] for r in requests}):
        mine = [r for r in requests if r["trainer"] == i]
        per_trainer[str(i)] = {"requests": len(mine), "ok": sum(r["outcome"] == "ok" for r in mine),
                               "ran_on_a_replica": dict(Counter(str(r["executions"]) for r in mine)),
                               "replicas": sorted({r["replica"] for r in mine if r["replica"]})}
    changes, last = [], None
    for sample in doc["replicas"]:
        key = (sample["running"], sample["starting"], sample["stopping"])
        if key != last:
            changes.append(sample)
            last = key
    out = {**doc, "per_trainer": per_trainer, "replicas": changes}
    if not keep_requests:
        out.pop("requests")
    return out


def print_table(doc: dict) -> None:
    c = doc["config"]
    table_line(f"ray_autoscale {c['autoscale']}, target {c['target']:g} ongoing requests per replica, upscale / "
               f"downscale delay {c['upscale_delay']:g} / {c['downscale_delay']:g} s, metrics every "
               f"{c['metrics_period']:g} s; {c['cpus_per_replica']:g} CPU per replica, {doc['cpus']} cores")
    table_line(f"{'from s':>7} {'to s':>6} {'trainers':>8} {'replicas':>9} {'at end':>6}  positions/s per trainer")
    for p in doc["phases"]:
        rng = f"{p['replicas_min']}-{p['replicas_max']}" if p["replicas_min"] is not None else "-"
        rates = " ".join(f"{v:.0f}" for v in p["positions_per_s"].values()) or "-"
        table_line(f"{p['from_s']:7.1f} {p['to_s']:6.1f} {p['trainers']:8d} {rng:>9} {str(p['replicas_at_end']):>6}  "
                   f"{rates}")
    for d in doc["scalings"]:
        verb = "ready" if d["direction"] == "up" else "removed"
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        table_line(f"{d['t']:6.1f} s, {d['trainers']} trainers: {d['direction']}scale {d['from']}->{d['to']} (ongoing "
                   f"{d['ongoing_requests']:.2f}); {'join' if d['direction'] == 'up' else 'leave'} to decision "
                   f"{fmt(d['load_to_decision_s'])} s, decision to {verb} {fmt(d['decision_to_done_s'])} s, total "
                   f"{fmt(d['load_to_done_s'])} s")
    s = doc["summary"]
    table_line(f"requests {s['requests']}: failed {s['failed']}, duplicated {s['duplicated']}, not run on a "
               f"replica {s['not_seen_on_a_replica']}, wrong answer id {s['wrong_answer_id']}; peak replicas "
               f"{s['peak_replicas']}, final {s['final_replicas']}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    import ray
    from ray import serve

    from adpa.services.ray.app import GRPC_SERVICER_FUNCTIONS, build_app

    plan = schedule(args)
    end = max(leave for _, leave in plan) + args.tail
    token = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="adpa-as-", dir="/tmp") as tmp:
        work = Path(args.workdir or tmp)
        teacher, reference, vocab = bench_models(args, work, args.max_len)
        ray_dir = work / "ray"
        with serve_settings(plain=False):  # Serve's request path as `adpa serve --ray` starts it
            ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=args.cpus,
                     _temp_dir=str(ray_dir),
                     runtime_env={"env_vars": {"ADPA_AUTH_TOKEN": token, "OMP_NUM_THREADS": "1"}})
        samples: list[dict] = []
        recorder = Recorder()
        stop = threading.Event()
        try:
            port = free_port()
            serve.start(http_options={"host": "127.0.0.1", "port": free_port()},
                        grpc_options={"port": port, "grpc_servicer_functions": GRPC_SERVICER_FUNCTIONS})
            deployed = time.monotonic()
            serve.run(build_app({
                "model": str(teacher), "reference": str(reference), "beta": 0.1, "torch_threads": 1,
                "max_inflight": 16, "ray_colocate_reference": True, "ray_cpus_per_replica": args.cpus_per_replica,
                "ray_autoscale": args.autoscale, "ray_target_ongoing_requests": args.target,
                "ray_upscale_delay_s": args.upscale_delay, "ray_downscale_delay_s": args.downscale_delay,
                "ray_autoscale_metrics_s": args.metrics_period, **({"device": args.device} if args.device else {}),
            }), name="adpa", route_prefix="/")
            first_ready_s = time.monotonic() - deployed
            t0, wall_t0 = time.monotonic(), time.time()
            watcher = threading.Thread(target=watch_replicas, args=(stop, t0, args.poll, samples), daemon=True)
            watcher.start()
            threads = [threading.Thread(target=run_trainer, daemon=True, args=(
                i, args, f"127.0.0.1:{port}", token, vocab, t0, join, leave, recorder)) for i, (join, leave) in
                enumerate(plan)]
            for t in threads:
                t.start()
            for i, t in enumerate(threads):
                t.join(plan[i][1] + 120)
                table_line(f"trainer {i} left at {time.monotonic() - t0:.1f} s")
            time.sleep(max(0.0, t0 + end - time.monotonic()))
            stop.set()
            watcher.join(10)
            serve.delete("adpa")  # replicas flush their access logs as they stop
        finally:
            stop.set()
            serve.shutdown()
            ray.shutdown()
        requests = sorted(recorder.requests, key=lambda r: r["start"])
        logs = ray_dir / "session_latest" / "logs" / "serve"
        ran = executions(logs, {r["request_id"] for r in requests})
        found = decisions(logs, wall_t0)
    for r in requests:
        r["executions"] = ran.get(r["request_id"], 0)
    scaled = scalings(found, samples, plan)
    running = [s["running"] for s in samples]
    summary = {
        "requests": len(requests),
        "failed": sum(r["outcome"] != "ok" for r in requests),
        "failed_by_status": dict(Counter(r["outcome"] for r in requests if r["outcome"] != "ok")),
        "duplicated": sum(r["executions"] > 1 for r in requests),
        "not_seen_on_a_replica": sum(r["executions"] == 0 for r in requests),
        "wrong_answer_id": sum(r["outcome"] == "ok" and r["answered_id"] != r["request_id"] for r in requests),
        "replicas_that_answered": len({r["replica"] for r in requests if r["replica"]}),
        "peak_replicas": max(running, default=0),
        "final_replicas": running[-1] if running else None,
        "first_replica_ready_s": first_ready_s,
    }
    ups = [d for d in scaled if d["direction"] == "up" and d["load_to_done_s"] is not None]
    if ups:
        summary["load_to_ready_s"] = [d["load_to_done_s"] for d in ups]
        summary["decision_to_ready_s"] = [d["decision_to_done_s"] for d in ups]
    doc = {"config": vars(args), "cpus": os.cpu_count(), "load_average": os.getloadavg(), "plan": plan,
           "phases": phases(plan, end, samples, requests), "scalings": scaled, "replicas": samples,
           "summary": summary, "requests": requests}
    print_table(doc)
    return emit(compact(doc, args.all_requests), args.out)


if __name__ == "__main__":
    sys.exit(main())
