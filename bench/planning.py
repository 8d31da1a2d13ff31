"""Planning cost: micro-batch planning time per sequence from 1k to 64k two-token sequences (flat =
linear), and one request of 65,536 such sequences answered end to end by `adpa serve`.

    adpa bench planning                                   # sizes 1k..64k, then the 65,536-sequence request
    adpa bench planning --sizes 1024,8192 --no-request    # planning only (a second)
    adpa bench planning --max-batch-tokens 2048 --out planning.json

Planning is what the engine does before any forward: the request's items, longest first
(`longest_first`), cut into micro-batches of at most max_batch_tokens padded tokens
(`plan_micro_batches`), and the same through the batching scheduler with a forward that does
nothing (`Scheduler`, its `_take_group` round-robin). Each size is timed best of --repeats.
Budget (DESIGN.md section 7): time per sequence flat within 2x from 1k to 64k, and the
65,536-sequence request (a teacher with its reference in process, ADVANTAGE top-k over gRPC, the
tiny model) answered in under 10 s. JSON on stdout (or --out), a table on stderr.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch

from adpa.bench.report import add_out, benchmark_parser, emit, table_line
from adpa.services.batching import Job, Scheduler, longest_first, plan_micro_batches

BUDGET_S = 10.0


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--sizes", default="1024,2048,4096,8192,16384,32768,65536",
                   help="comma-separated numbers of two-token sequences")
    p.add_argument("--max-batch-tokens", type=int, default=8192, help="the engine's max_batch_tokens")
    p.add_argument("--repeats", type=int, default=3, help="timings per size (the best is kept)")
    p.add_argument("--request-sequences", type=int, default=65536, help="sequences of the end-to-end request")
    p.add_argument("--no-request", action="store_true", help="skip the end-to-end request (no server started)")
    p.add_argument("--k", type=int, default=8, help="top-k of the end-to-end request's support")
    p.add_argument("--threads", type=int, default=1, help="the server's torch threads")
    add_out(p)
    return p.parse_args(argv)


def two_token_job(n: int, caller: str = "") -> Job:
    """n sequences of two tokens, one scored position each (the request of issue 23)."""
    sequences = [torch.tensor([1, 2 + b % 50]) for b in range(n)]
    return Job(sequences, [(1, 2)] * n, lambda *a: None, caller=caller)


def best_of(repeats: int, setup, fn) -> float:
    """The shortest of `repeats` timings of fn(setup()), setup (building the job) untimed."""
    times = []
    for _ in range(repeats):
        arg = setup()
        gc.collect()  # a collection of earlier garbage inside the timing is not planning's cost
        started = time.perf_counter()
        fn(arg)
        times.append(time.perf_counter() - started)
    return min(times)


def measure_planning(n: int, max_batch_tokens: int, repeats: int) -> dict:
    def plan(job: Job) -> None:
        for _ in plan_micro_batches(longest_first(job), max_batch_tokens):
            pass

    def schedule(job: Job) -> None:
        Scheduler(lambda group: None, max_batch_tokens=max_batch_tokens).run(job)

    plan_s = best_of(repeats, lambda: two_token_job(n), plan)
    schedule_s = best_of(repeats, lambda: two_token_job(n, "bench"), schedule)
    return {"sequences": n, "plan_s": plan_s, "plan_us_per_sequence": 1e6 * plan_s / n,
            "scheduler_s": schedule_s, "scheduler_us_per_sequence": 1e6 * schedule_s / n}


def measure_request(args) -> dict:
    """`adpa serve` (teacher, reference in process, tiny models), one ADVANTAGE top-k request of
    `request_sequences` two-token sequences from the Python client, timed from call to answer."""
    from adpa.client import TeacherClient
    from adpa.protocol import SupportSpec
    from adpa.services.launch import ServiceProcess
    from adpa.tiny_model import make_tiny_model

    n = args.request_sequences
    with tempfile.TemporaryDirectory() as tmp:
        teacher = make_tiny_model(Path(tmp) / "teacher", seed=1)
        reference = make_tiny_model(Path(tmp) / "reference", seed=2)
        server = ServiceProcess(["--role", "teacher", "--model", str(teacher), "--reference", str(reference),
                                 "--device", "cpu", "--torch-threads", str(args.threads), "--log-level", "WARNING",
                                 "--max-batch-tokens", str(args.max_batch_tokens)], http=False)
        job = two_token_job(n)
        try:
            server.start()
            with TeacherClient(server.endpoint, timeout=600.0) as client:
                client.info()
                started = time.perf_counter()
                answer = client.score(job.sequences, job.ranges, signal="advantage", support=SupportSpec("topk", k=args.k))
                wall = time.perf_counter() - started
        finally:
            server.stop()
    return {"sequences": n, "positions": int(answer.values.shape[0]), "wall_s": wall, "budget_s": BUDGET_S,
            "within_budget": wall < BUDGET_S}


def table(doc: dict) -> str:
    lines = [f"{'sequences':>10} {'plan ms':>9} {'us/seq':>7} {'scheduler ms':>13} {'us/seq':>7}"]
    for r in doc["planning"]:
        lines.append(f"{r['sequences']:>10} {1e3 * r['plan_s']:>9.1f} {r['plan_us_per_sequence']:>7.2f} "
                     f"{1e3 * r['scheduler_s']:>13.1f} {r['scheduler_us_per_sequence']:>7.2f}")
    lines.append(f"per-sequence spread (max/min): plan {doc['plan_spread']:.2f}x, scheduler "
                 f"{doc['scheduler_spread']:.2f}x (budget 2x)")
    if doc.get("request"):
        r = doc["request"]
        lines.append(f"end to end: {r['sequences']} sequences ({r['positions']} positions) answered in "
                     f"{r['wall_s']:.2f} s (budget {r['budget_s']:.0f} s)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    torch.set_num_threads(args.threads)
    rows = [measure_planning(n, args.max_batch_tokens, args.repeats) for n in sizes]

    def spread(key: str) -> float:
        values = [r[key] for r in rows]
        return max(values) / min(values)

    doc = {"max_batch_tokens": args.max_batch_tokens, "planning": rows,
           "plan_spread": spread("plan_us_per_sequence"), "scheduler_spread": spread("scheduler_us_per_sequence"),
           "request": None if args.no_request else measure_request(args),
           "command": " ".join(["adpa bench planning", *(argv if argv is not None else sys.argv[1:])])}
    table_line(table(doc))
    return emit(doc, args.out)
