"""Fairness benchmark: 8 trainers with unequal requests share one teacher (standalone and Ray Serve); each trainer's scored positions/s over a window, and the ratio of the best served to the worst served.

    adpa bench fairness --out fairness.json                  # standalone and Ray (about 3 minutes)
    adpa bench fairness --modes standalone --window 10       # a quick look

Builds the tiny teacher and reference of bench/concurrency.py and runs, in each mode (standalone:
an `adpa serve` teacher with its reference in process; ray: the same as one Ray Serve replica),
`--trainers` closed-loop trainers at once, each with its own TeacherClient (its own caller for the
scheduler): trainer 0 sends `--big-batch` (64) long sequences per request (`--long-len`), the
others `--small-batch` (4) short ones (`--short-len`), ADVANTAGE top-k on the second half of each
sequence, the next request as soon as the answer is back. After `--warmup` seconds of load, each
trainer's positions are counted over `--window` seconds, a request's positions spread evenly over
the time it was in flight (a long request takes seconds: counting whole answers would quantise
its trainer's figure). Reported: per trainer positions/s, requests, median latency; max/min of
positions/s (1.0: equal shares; the goal is 1.5 or less), and the machine's load average before
and after (other work on the machine slows every trainer alike, but shows in the absolute figures).

JSON goes to stdout (or --out), a table to stderr.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers.utils import logging as hf_logging

from adpa.bench.concurrency import (add_model_args, bench_models, closed_loop, ray_app, ray_cluster, requests_for,
                                   standalone)
from adpa.bench.report import add_out, benchmark_parser, comma_choices, emit, table_line
from adpa.protocol import SupportSpec


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--modes", default="standalone,ray", help="comma-separated: standalone, ray")
    p.add_argument("--trainers", type=int, default=8, help="trainers at once: one big, the others small")
    p.add_argument("--big-batch", type=int, default=64, help="sequences per request of the big trainer")
    p.add_argument("--long-len", default="96-128", help="the big trainer's sequence lengths, MIN-MAX tokens")
    p.add_argument("--small-batch", type=int, default=4, help="sequences per request of each small trainer")
    p.add_argument("--short-len", default="24-32", help="the small trainers' sequence lengths, MIN-MAX tokens")
    p.add_argument("--window", type=float, default=30.0, help="seconds over which positions are counted")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds of load before the window")
    p.add_argument("--k", type=int, default=8, help="top-k of the support")
    p.add_argument("--batch-wait-ms", type=float, default=0.0, help="the servers' --batch-wait-ms")
    p.add_argument("--deterministic", action="store_true", help="the servers' --deterministic")
    p.add_argument("--turn-hold-ms", type=float, help="the servers' --turn-hold-ms (default: theirs, 0): above "
                   "the trainers' round trip, which a loaded machine stretches")
    add_model_args(p)
    p.add_argument("--workdir", help="where models and logs go (default: a temporary folder)")
    add_out(p)
    args = p.parse_args(argv)
    args.reference, args.max_inflight = "process", 64  # what bench/concurrency.py's servers read
    return args


def lengths(text: str) -> tuple[int, int]:
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def trainer_requests(args, trainer: int, vocab: int) -> list[tuple[list[list[int]], list[tuple[int, int]]]]:
    """Trainer 0's cycle of big requests, or a small trainer's cycle; the second half of each sequence scored."""
    batch, (low, high) = (args.big_batch, lengths(args.long_len)) if trainer == 0 else (
        args.small_batch, lengths(args.short_len))
    return requests_for(SimpleNamespace(batch=batch, min_len=low, max_len=high), trainer, vocab, count=8)


def overlap_share(sent: float, answered: float, start: float, end: float) -> float:
    """The part of [sent, answered] inside [start, end]: a request's positions counted in the window."""
    inside = min(answered, end) - max(sent, start)
    return max(inside, 0.0) / max(answered - sent, 1e-9)


def run_trainers(args, endpoint: str, token: str | None, vocab: int) -> dict:
    """Every trainer at once for warmup + window; each trainer's positions/s over the window."""
    stop = threading.Event()
    records: list[list[tuple[float, float, int]]] = [[] for _ in range(args.trainers)]  # (sent, answered, positions)
    errors: list[str] = []
    support = SupportSpec("topk", k=args.k)

    def trainer(i: int) -> None:
        for sent, answered, ranges in closed_loop(endpoint, token, trainer_requests(args, i, vocab), stop, support,
                                                  errors, timeout=300):
            records[i].append((sent, answered, sum(e - s for s, e in ranges)))

    threads = [threading.Thread(target=trainer, args=(i,), daemon=True) for i in range(args.trainers)]
    for t in threads:
        t.start()
    time.sleep(args.warmup)
    start = time.perf_counter()
    time.sleep(args.window)
    end = time.perf_counter()
    stop.set()
    for t in threads:  # requests in flight at the window's end still count, for their part inside it
        t.join(300)
    per_trainer = []
    for i, done in enumerate(records):
        inside = [(s, a, n) for s, a, n in done if overlap_share(s, a, start, end) > 0]
        per_trainer.append({
            "trainer": i,
            "kind": "big" if i == 0 else "small",
            "positions_per_s": sum(n * overlap_share(s, a, start, end) for s, a, n in inside) / (end - start),
            "requests": len(inside),
            "latency_p50_ms": 1000 * statistics.median(a - s for s, a, _ in inside) if inside else None,
        })
    rates = [t["positions_per_s"] for t in per_trainer]
    return {"trainers": per_trainer, "errors": len(errors), "error_examples": errors[:3],
            "total_positions_per_s": sum(rates), "max_over_min": max(rates) / max(min(rates), 1e-9)}


def print_table(doc: dict) -> None:
    c = doc["config"]
    model = f"preset {c['preset']}" if c.get("preset") else f"{c['layers']}x{c['hidden']}"
    table_line(f"model {model}, V={doc['vocab_size']}; trainer 0: {c['big_batch']} sequences of "
               f"{c['long_len']} tokens per request; trainers 1-{c['trainers'] - 1}: {c['small_batch']} of "
               f"{c['short_len']}; second half scored, ADVANTAGE top-{c['k']}; {c['window']:.0f} s window after "
               f"{c['warmup']:.0f} s; {doc['cpus']} CPUs" + ("; --deterministic" if c["deterministic"] else "")
               + (f"; --turn-hold-ms {c['turn_hold_ms']:g}" if c["turn_hold_ms"] is not None else ""))
    for run in doc["runs"]:
        table_line(f"{run['mode']}: load average {run['load_before'][0]:.1f} before, {run['load_after'][0]:.1f} after; "
                   f"{run['errors']} errors")
        table_line(f"  {'trainer':>7} {'kind':5} {'pos/s':>8} {'requests':>8} {'p50 ms':>8}")
        for t in run["trainers"]:
            p50 = f"{t['latency_p50_ms']:8.0f}" if t["latency_p50_ms"] is not None else f"{'-':>8}"
            table_line(f"  {t['trainer']:7d} {t['kind']:5} {t['positions_per_s']:8.0f} {t['requests']:8d} {p50}")
        table_line(f"  total {run['total_positions_per_s']:.0f} pos/s; max/min {run['max_over_min']:.2f}")


def main(argv=None) -> int:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()
    modes = comma_choices(args.modes, ("standalone", "ray"), "--modes")
    runs = []
    with tempfile.TemporaryDirectory(prefix="adpa-bench-") as tmp:
        work = Path(args.workdir or tmp)
        teacher, reference, vocab = bench_models(args, work, max(*lengths(args.long_len), *lengths(args.short_len)))
        for mode in modes:
            with ExitStack() as stack:
                if mode == "ray":
                    server = ray_app(args, stack.enter_context(ray_cluster(work)), teacher, reference, True)
                else:
                    server = standalone(args, work, teacher, reference, True)
                endpoint, token, _, _ = stack.enter_context(server)
                before = os.getloadavg()
                run = run_trainers(args, endpoint, token, vocab)
                runs.append({"mode": mode, "load_before": before, "load_after": os.getloadavg(), **run})
                table_line(f"{mode}: max/min {run['max_over_min']:.2f}")
    doc = {"config": vars(args), "vocab_size": vocab, "cpus": os.cpu_count(), "torch": torch.__version__,
           "runs": runs, "summary": {f"{r['mode']}: max/min positions/s": r["max_over_min"] for r in runs}}
    print_table(doc)
    return emit(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
