"""Batch invariance: under a burst of 4x a teacher's admission capacity, how many answers differ from the same requests answered alone, with and without `--deterministic`, and what the mode costs in throughput.

    adpa bench deterministic --out deterministic.json        # both settings (about 2 minutes)
    adpa bench deterministic --settings deterministic        # the mode alone

For each setting (default, deterministic) an `adpa serve` teacher starts (the tiny models of
bench/concurrency.py, reference in process, `--max-inflight CAPACITY`, one torch thread). It
answers `--requests` distinct requests alone, one after another (4 sequences of mixed lengths,
ADVANTAGE on top-k with the log-probs of both models included), then a burst: 4 x CAPACITY
threads, each with its own TeacherClient (its own caller, so that requests of several callers
share micro-batches), send `--per-thread` of those requests each at once, refusals retried by
the client. Every answer is compared with the lone answer bit for bit (ids, advantages, tails,
both models' log-probs). Reported: answers that differ and the largest |difference|, the burst's
wall time and positions/s, and steady throughput: `--trainers` closed-loop trainers for
`--duration` s (bench/concurrency.py's load); the ratios deterministic / default of both.

JSON goes to stdout (or --out), a table to stderr.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers.utils import logging as hf_logging

from adpa.bench.concurrency import add_model_args, bench_models, run_point, standalone
from adpa.bench.report import add_out, benchmark_parser, comma_choices, emit, table_line
from adpa.client import TeacherClient
from adpa.protocol import ScoreResult, SupportSpec


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--settings", default="default,deterministic", help="comma-separated: default, deterministic")
    p.add_argument("--capacity", type=int, default=4, help="the teacher's --max-inflight; the burst is 4x this")
    p.add_argument("--requests", type=int, default=8, help="distinct requests")
    p.add_argument("--per-thread", type=int, default=5, help="requests each burst thread sends")
    p.add_argument("--min-len", type=int, default=40, help="shortest sequence")
    p.add_argument("--max-len", type=int, default=250, help="longest sequence")
    p.add_argument("--k", type=int, default=8, help="top-k of the support")
    p.add_argument("--trainers", type=int, default=8, help="closed-loop trainers of the steady throughput")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of steady load")
    add_model_args(p)
    p.add_argument("--workdir", help="where models and logs go (default: a temporary folder)")
    add_out(p)
    return p.parse_args(argv)


def make_requests(args, vocab: int) -> list[dict]:
    """Keyword arguments of TeacherClient.score: 4 sequences of mixed lengths each, all but the first token scored."""
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(args.requests):
        lengths = torch.randint(args.min_len, args.max_len + 1, (4,), generator=g).tolist()
        sequences = [torch.randint(7, vocab, (n,), generator=g).tolist() for n in lengths]
        out.append(dict(sequences=sequences, ranges=[(0, n - 1) for n in lengths], signal="advantage",
                        support=SupportSpec("topk", k=args.k), include_logprobs=True))
    return out


def tensors(result: ScoreResult) -> dict[str, torch.Tensor]:
    found = {"indices": result.indices, "values": result.values, "tail": result.tail, "weights": result.weights,
             **result.extras}
    return {name: t for name, t in found.items() if t is not None}


def difference(got: ScoreResult, want: ScoreResult) -> float | None:
    """None when every tensor of the answer is bit-identical; else the largest |difference| (inf: other ids)."""
    a, b = tensors(got), tensors(want)
    if a.keys() != b.keys() or any(a[n].shape != b[n].shape for n in a):
        return float("inf")
    if all(torch.equal(a[n], b[n]) for n in a):
        return None
    if not torch.equal(a["indices"], b["indices"]):
        return float("inf")
    return max(float((a[n].float() - b[n].float()).abs().nan_to_num(posinf=0.0, neginf=0.0).max()) for n in a)


def burst(args, endpoint: str, requests: list[dict]) -> dict:
    with TeacherClient(endpoint, timeout=300) as client:
        alone = [client.score(**kwargs) for kwargs in requests]
    threads = 4 * args.capacity
    start = threading.Barrier(threads)
    diffs: list[float | None] = []
    lock = threading.Lock()

    def caller(index: int) -> None:
        with TeacherClient(endpoint, timeout=300) as client:
            client.info()
            start.wait()
            for j in range(args.per_thread):
                which = (index + j) % len(requests)
                got = client.score(**requests[which])
                with lock:
                    diffs.append(difference(got, alone[which]))

    workers = [threading.Thread(target=caller, args=(i,)) for i in range(threads)]
    began = time.perf_counter()
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    wall = time.perf_counter() - began
    positions = sum(sum(e - s for s, e in requests[(i + j) % len(requests)]["ranges"])
                    for i in range(threads) for j in range(args.per_thread))
    differing = [d for d in diffs if d is not None]
    return {"threads": threads, "answers": len(diffs), "differing": len(differing),
            "max_abs_diff": max(differing, default=0.0), "wall_s": wall, "positions_per_s": positions / wall}


def main(argv=None) -> int:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    settings = comma_choices(args.settings, ("default", "deterministic"), "--settings")
    runs = []
    with tempfile.TemporaryDirectory(prefix="adpa-bench-") as tmp:
        work = Path(args.workdir or tmp)
        teacher, reference, vocab = bench_models(args, work, args.max_len)
        requests = make_requests(args, vocab)
        for setting in settings:
            server_args = SimpleNamespace(
                reference="process", batch_wait_ms=0.0, device=args.device, max_inflight=args.capacity,
                deterministic=setting == "deterministic")
            load = SimpleNamespace(batch=4, min_len=16, max_len=48, k=args.k, warmup=1.0, duration=args.duration)
            with standalone(server_args, work, teacher, reference, True) as (endpoint, _, metrics_url, _pids):
                before = os.getloadavg()
                result = burst(args, endpoint, requests)
                steady = run_point(load, endpoint, None, metrics_url, args.trainers, vocab)
            runs.append({"setting": setting, "load_before": before, "load_after": os.getloadavg(), "burst": result,
                         "steady": steady})
            table_line(f"{setting}: {result['differing']} of {result['answers']} answers differ")
    by = {r["setting"]: r for r in runs}
    summary = {}
    if len(by) == 2:
        summary = {
            "burst positions/s, deterministic / default":
                by["deterministic"]["burst"]["positions_per_s"] / by["default"]["burst"]["positions_per_s"],
            f"steady positions/s at {args.trainers} trainers, deterministic / default":
                by["deterministic"]["steady"]["positions_per_s"] / by["default"]["steady"]["positions_per_s"],
        }
    doc = {"config": vars(args), "vocab_size": vocab, "cpus": os.cpu_count(), "torch": torch.__version__, "runs": runs, "summary": summary}
    model = f"preset {args.preset}" if args.preset else f"{args.layers}x{args.hidden}"
    table_line(f"model {model}, V={vocab}; {args.requests} requests of 4 sequences of "
               f"{args.min_len}-{args.max_len} tokens, ADVANTAGE top-{args.k} with both log-probs; burst: "
               f"{4 * args.capacity} threads x {args.per_thread} on --max-inflight {args.capacity}; steady: "
               f"{args.trainers} trainers x {args.duration:.0f} s; {doc['cpus']} CPUs")
    table_line(f"{'setting':14} {'differ':>9} {'max |diff|':>10} {'burst s':>8} {'burst pos/s':>11} "
               f"{'steady pos/s':>12} {'load':>9}")
    for r in runs:
        b = r["burst"]
        table_line(f"{r['setting']:14} {b['differing']:>4} / {b['answers']:<3} {b['max_abs_diff']:10.2e} "
                   f"{b['wall_s']:8.1f} {b['positions_per_s']:11.0f} {r['steady']['positions_per_s']:12.0f} "
                   f"{r['load_before'][0]:4.1f}>{r['load_after'][0]:<4.1f}")
    for name, value in summary.items():
        table_line(f"{name}: {value:.2f}")
    return emit(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
