"""Soak and burst: steady load on a teacher for N minutes (server RSS over time, errors, latency percentiles), then a burst of 4x its admission capacity (is every request answered, correctly? p50/p99, peak RSS).

    .venv/bin/python robustness/soak.py                              # 10 minutes steady, then the burst
    .venv/bin/python robustness/soak.py --minutes 0.5 --burst-requests 2 --out soak.json  # a quick run

Builds the tiny models (adpa.tiny_model) and starts a reference and a teacher with that remote
reference (`adpa serve --max-inflight CAPACITY`), each with one torch thread. Steady load:
`--callers` threads (default: the capacity) each send requests back to back through their own
TeacherClient, a mix of LOGPROBS and ADVANTAGE on TOPK, INDICES and SAMPLED supports of 1-8
sequences, with one request in 20 deliberately invalid (its refusal is expected and counted
apart). Errors are everything else that failed. The servers' RSS is sampled every
`--sample-s` seconds. Burst: 4 x CAPACITY threads share one TeacherClient (default retry
settings) and each sends `--burst-requests` heavy requests (4 x 250 tokens) at once; every answer is compared with the
same request answered alone (same ids; values within 1e-4, the round-off of sharing a forward
with other callers' sequences). JSON goes to stdout (or --out), a table to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import grpc
import httpx
import torch

from adpa.client import TeacherClient
from adpa.protocol import SupportSpec

ENV = {"OMP_NUM_THREADS": "1", "ADPA_TORCH_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
VOCAB = 77


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--minutes", type=float, default=10.0, help="length of the steady phase")
    p.add_argument("--capacity", type=int, default=4, help="the teacher's --max-inflight")
    p.add_argument("--callers", type=int, default=None, help="steady-phase threads (default: the capacity)")
    p.add_argument("--burst-requests", type=int, default=5, help="requests per burst thread")
    p.add_argument("--sample-s", type=float, default=5.0, help="RSS sampling period in the steady phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where the tiny models and server logs go (default: a temp dir)")
    p.add_argument("--out", default=None, help="write the JSON here instead of stdout")
    return p.parse_args(argv)


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50_ms": round(1000 * at(0.5), 1), "p99_ms": round(1000 * at(0.99), 1),
            "max_ms": round(1000 * ordered[-1], 1), "mean_ms": round(1000 * statistics.fmean(ordered), 1)}


def metric(http_port: int, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"http://127.0.0.1:{http_port}/metrics", timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def random_request(rng: random.Random, heavy: bool = False) -> tuple[dict, bool]:
    """Keyword arguments of TeacherClient.score, and whether the request is valid. Heavy: 4 sequences
    of 250 tokens, all scored (the shape of issue 11's overload report, ~100 ms alone on 2 cores)."""
    count = 4 if heavy else rng.randint(1, 8)
    sequences = [[rng.randrange(7, VOCAB) for _ in range(250 if heavy else rng.randint(8, 120))]
                 for _ in range(count)]
    ranges = [(0 if heavy else rng.randrange(0, len(s) // 2), len(s)) for s in sequences]
    positions = sum(e - s for s, e in ranges)
    kind = rng.choice(["topk", "topk", "indices", "sampled"])
    if kind == "topk":
        support = SupportSpec("topk", k=rng.choice([4, 8, 32]))
    elif kind == "indices":
        support = SupportSpec("indices", k=4, indices=torch.randint(0, VOCAB, (positions, 3),
                                                                    generator=torch.Generator().manual_seed(rng.randrange(10**6))))
    else:
        support = SupportSpec("sampled", n=rng.choice([4, 12]), seed=rng.randrange(2**32))
    valid = heavy or rng.randrange(20) != 0
    if not valid:  # one of the ways a caller gets it wrong
        sequences[0][0] = VOCAB + 5
    return dict(sequences=sequences, ranges=ranges, signal=rng.choice(["logprobs", "advantage"]), support=support,
                value_dtype=rng.choice(["FP32", "BF16"])), valid


class Sampler(threading.Thread):
    """RSS of the server processes every `period_s` seconds until stopped."""

    def __init__(self, pids: dict[str, int], period_s: float):
        super().__init__(daemon=True)
        self.pids, self.period_s = pids, period_s
        self.samples: list[dict] = []
        self._stop_event = threading.Event()
        self._t0 = time.monotonic()

    def sample(self) -> dict:
        row = {"t_s": round(time.monotonic() - self._t0, 1),
               **{f"{name}_rss_mb": round(rss_mb(pid), 1) for name, pid in self.pids.items()}}
        self.samples.append(row)
        return row

    def run(self) -> None:
        while not self._stop_event.wait(self.period_s):
            self.sample()

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def steady(endpoint: str, callers: int, seconds: float, seed: int) -> dict:
    latencies: list[float] = []
    outcomes = {"answered": 0, "refused_as_expected": 0, "errors": 0}
    errors: dict[str, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def caller(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with TeacherClient(endpoint) as client:
            while time.monotonic() < deadline:
                kwargs, valid = random_request(rng)
                started = time.perf_counter()
                try:
                    client.score(**kwargs)
                    outcome = "answered" if valid else "errors"
                    key = None if valid else "invalid request answered"
                except grpc.RpcError as err:
                    expected = not valid and err.code() == grpc.StatusCode.INVALID_ARGUMENT
                    outcome = "refused_as_expected" if expected else "errors"
                    key = None if expected else f"{err.code().name}: {(err.details() or '')[:80]}"
                elapsed = time.perf_counter() - started
                with lock:
                    outcomes[outcome] += 1
                    if outcome == "answered":
                        latencies.append(elapsed)
                    if key is not None:
                        errors[key] = errors.get(key, 0) + 1

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(callers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**outcomes, "error_kinds": errors, "latency": percentiles(latencies),
            "requests_per_s": round((outcomes["answered"] + outcomes["refused_as_expected"]) / seconds, 2)}


def same_answer(got, want, atol: float = 1e-4) -> bool:
    """Same ids, values equal up to the round-off of batching with other callers' sequences (services/batching.py)."""
    for a, b in ((got.indices, want.indices), (got.values, want.values), (got.tail, want.tail),
                 (got.weights, want.weights)):
        if (a is None) != (b is None) or (a is not None and a.shape != b.shape):
            return False
        if a is not None and (a.dtype == torch.long and not torch.equal(a, b) or
                              a.dtype != torch.long and not torch.allclose(a, b, atol=atol, rtol=0, equal_nan=True)):
            return False
    return True


def burst(endpoint: str, threads: int, per_thread: int, pid: int, seed: int) -> dict:
    rng = random.Random(seed)
    requests = [random_request(rng, heavy=True)[0] for _ in range(8)]
    with TeacherClient(endpoint) as client:
        solo = [client.score(**kwargs) for kwargs in requests]
        start = threading.Barrier(threads)
        latencies: list[float] = []
        outcomes: dict[str, int] = {}
        lock = threading.Lock()
        peak = {"rss_mb": rss_mb(pid)}
        done = threading.Event()

        def watch() -> None:
            while not done.wait(0.1):
                peak["rss_mb"] = max(peak["rss_mb"], rss_mb(pid))

        def caller(index: int) -> None:
            start.wait()
            for j in range(per_thread):
                which = (index + j) % len(requests)
                started = time.perf_counter()
                try:
                    got = client.score(**requests[which])
                    outcome = "answered_correctly" if same_answer(got, solo[which]) else "answered_differently"
                except grpc.RpcError as err:
                    outcome = err.code().name
                with lock:
                    outcomes[outcome] = outcomes.get(outcome, 0) + 1
                    latencies.append(time.perf_counter() - started)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        started = time.perf_counter()
        workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        wall = time.perf_counter() - started
        done.set()
        watcher.join()
    solo_latency = []
    with TeacherClient(endpoint) as client:
        for kwargs in requests:
            t0 = time.perf_counter()
            client.score(**kwargs)
            solo_latency.append(time.perf_counter() - t0)
    return {"threads": threads, "requests": threads * per_thread, "outcomes": outcomes,
            "all_answered_correctly": outcomes.get("answered_correctly", 0) == threads * per_thread,
            "latency": percentiles(latencies), "alone": percentiles(solo_latency), "wall_s": round(wall, 1),
            "teacher_peak_rss_mb": round(peak["rss_mb"], 1)}


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from adpa.services.launch import ServiceProcess
    from adpa.tiny_model import make_tiny_model

    callers = args.callers or args.capacity
    with ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        workdir.mkdir(parents=True, exist_ok=True)
        teacher_model = make_tiny_model(workdir / "teacher", layers=2, hidden=64, seed=1)
        reference_model = make_tiny_model(workdir / "reference", layers=2, hidden=64, seed=2)
        reference = stack.enter_context(ServiceProcess(["--role", "reference", "--model", str(reference_model)],
                                                       env=ENV, log_path=workdir / "reference.log"))
        teacher = stack.enter_context(ServiceProcess(
            ["--role", "teacher", "--model", str(teacher_model), "--reference", reference.endpoint, "--beta", "0.5",
             "--max-inflight", str(args.capacity), "--log-level", "WARNING"],
            env=ENV, log_path=workdir / "teacher.log"))
        pids = {"teacher": teacher.proc.pid, "reference": reference.proc.pid}
        sampler = Sampler(pids, args.sample_s)
        first = sampler.sample()
        sampler.start()
        load = steady(teacher.endpoint, callers, 60 * args.minutes, args.seed)
        sampler.stop()
        last = sampler.sample()
        refused_before = metric(teacher.http_port, "adpa_requests_total", method="Score", code="RESOURCE_EXHAUSTED")
        spike = burst(teacher.endpoint, 4 * args.capacity, args.burst_requests, teacher.proc.pid, args.seed + 1)
        spike["server_refusals"] = int(metric(teacher.http_port, "adpa_requests_total", method="Score",
                                              code="RESOURCE_EXHAUSTED") - refused_before)
        series = sampler.samples
        # Growth after warm-up: the first sample after the first minute (or the first one) against the last.
        warm = next((s for s in series if s["t_s"] >= 60), series[0])
        steady_result = {
            "minutes": args.minutes, "callers": callers, "capacity": args.capacity, **load,
            "rss_mb": {name: {"start": first[f"{name}_rss_mb"], "after_warmup": warm[f"{name}_rss_mb"],
                              "end": last[f"{name}_rss_mb"],
                              "max": max(s[f"{name}_rss_mb"] for s in series),
                              "growth_after_warmup": round(last[f"{name}_rss_mb"] - warm[f"{name}_rss_mb"], 1)}
                       for name in pids},
            "rss_series": series,
        }
    result = {"steady": steady_result, "burst": spike,
              "load_avg_at_end": Path("/proc/loadavg").read_text().split()[:3]}
    text = json.dumps(result, indent=2)
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    s, b = steady_result, spike
    print(f"steady {s['minutes']:g} min, {s['callers']} callers, capacity {s['capacity']}: "
          f"{s['answered']} answered, {s['refused_as_expected']} refused as expected, {s['errors']} errors; "
          f"{s['requests_per_s']} req/s; p50 {s['latency'].get('p50_ms')} ms, p99 {s['latency'].get('p99_ms')} ms",
          file=sys.stderr)
    print(f"{'process':10} {'start MB':>9} {'warm MB':>8} {'end MB':>7} {'max MB':>7} {'growth':>7}", file=sys.stderr)
    for name, r in s["rss_mb"].items():
        print(f"{name:10} {r['start']:9.1f} {r['after_warmup']:8.1f} {r['end']:7.1f} {r['max']:7.1f} "
              f"{r['growth_after_warmup']:7.1f}", file=sys.stderr)
    print(f"burst {b['threads']} threads x {b['requests'] // b['threads']}: {b['outcomes']} "
          f"(server refusals {b['server_refusals']}); p50 {b['latency']['p50_ms']} ms, p99 {b['latency']['p99_ms']} ms "
          f"(alone p50 {b['alone']['p50_ms']} ms), {b['wall_s']} s in all; teacher peak RSS {b['teacher_peak_rss_mb']} MB", file=sys.stderr)
    return 0 if b["all_answered_correctly"] and s["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
