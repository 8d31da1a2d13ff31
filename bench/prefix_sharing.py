"""Prompt computed once: teacher time and forwarded tokens per scored position, with and without
shared prefixes, on DCKD-shaped requests (each prompt scored with y_w and y_l).

    .venv/bin/python bench/prefix_sharing.py                 # ratios 1:1 and 4:1 (about a minute)
    .venv/bin/python bench/prefix_sharing.py --layers 8 --hidden 512 --response 128 --ratios 1,4,8

For each prompt:response length ratio, the same requests are scored by one engine with
`min_shared_prefix=0` (every token forwarded) and one with sharing on; reported: the median time
per request and per scored position, the tokens the model forwards (shared: each prompt once),
and the largest difference between the two engines' log-probs (fp32 round-off). One torch
thread. JSON on stdout (or --out), a table on stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from adpa.bench.report import add_out, benchmark_parser, emit, table_line
from adpa.protocol import SupportSpec
from adpa.services.engine import ScoringEngine
from adpa.services.prefix import shared_prefix_groups
from adpa.tiny_model import make_tiny_model


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--ratios", default="1,4", help="comma-separated prompt:response length ratios")
    p.add_argument("--response", type=int, default=48, help="response tokens (y_w and y_l alike)")
    p.add_argument("--prompts", type=int, default=8, help="prompts per request (2 sequences each)")
    p.add_argument("--layers", type=int, default=4, help="transformer layers of the tiny model")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny model")
    p.add_argument("--repeats", type=int, default=7, help="timed calls per setting (median reported)")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    add_out(p)
    return p.parse_args(argv)


def dckd_request(args, ratio: int, vocab: int):
    g = torch.Generator().manual_seed(ratio)
    prompts = [torch.randint(7, vocab, (ratio * args.response,), generator=g) for _ in range(args.prompts)]
    seqs = [torch.cat([p, torch.randint(7, vocab, (args.response,), generator=g)]) for p in prompts * 2]
    ranges = [(len(s) - args.response - 1, len(s) - 1) for s in seqs]
    return seqs, ranges


def median_time(engine, seqs, ranges, spec, repeats: int) -> float:
    engine.score(seqs, ranges, spec)  # warm-up
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        engine.score(seqs, ranges, spec)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    spec = SupportSpec("topk", k=32)
    rows = []
    with tempfile.TemporaryDirectory(prefix="adpa-bench-") as tmp:
        longest = max(int(r) for r in args.ratios.split(",")) * args.response + args.response
        model = make_tiny_model(Path(tmp) / "teacher", seed=1, layers=args.layers, hidden=args.hidden,
                                max_seq_len=max(256, longest))
        load = dict(device=args.device, dtype="float32" if args.device == "cpu" else "auto", batching=False)
        plain = ScoringEngine.from_pretrained(str(model), min_shared_prefix=0, **load)
        shared = ScoringEngine.from_pretrained(str(model), min_shared_prefix=16, **load)
        for ratio in (int(r) for r in args.ratios.split(",")):
            seqs, ranges = dckd_request(args, ratio, plain.shared_vocab)
            positions = sum(e - s for s, e in ranges)
            groups = shared_prefix_groups(seqs, shared.min_shared_prefix)
            tokens_plain = sum(len(s) for s in seqs)
            tokens_shared = tokens_plain - sum((len(members) - 1) * p for members, p in groups)
            diff = (shared.score(seqs, ranges, spec).logprobs - plain.score(seqs, ranges, spec).logprobs).abs().max()
            t_plain = median_time(plain, seqs, ranges, spec, args.repeats)
            t_shared = median_time(shared, seqs, ranges, spec, args.repeats)
            rows.append({
                "ratio": f"{ratio}:1", "prompt_tokens": ratio * args.response, "response_tokens": args.response,
                "sequences": len(seqs), "scored_positions": positions,
                "tokens_forwarded_plain": tokens_plain, "tokens_forwarded_shared": tokens_shared,
                "ms_per_request_plain": 1000 * t_plain, "ms_per_request_shared": 1000 * t_shared,
                "us_per_position_plain": 1e6 * t_plain / positions, "us_per_position_shared": 1e6 * t_shared / positions,
                "speedup": t_plain / t_shared, "max_abs_logprob_diff": float(diff),
            })
    doc = {"config": vars(args), "torch": torch.__version__, "rows": rows}
    table_line(f"model {args.layers}x{args.hidden}, {args.prompts} prompts x (y_w, y_l), "
               f"responses of {args.response} tokens, "
               f"top-32 log-probs, median of {args.repeats}, {args.threads} thread(s) on {args.device}")
    table_line(f"{'ratio':>5} {'tokens plain':>12} {'tokens shared':>13} {'us/pos plain':>12} {'us/pos shared':>13} "
               f"{'speed-up':>8} {'max |diff|':>10}")
    for r in rows:
        table_line(f"{r['ratio']:>5} {r['tokens_forwarded_plain']:12d} {r['tokens_forwarded_shared']:13d} "
                   f"{r['us_per_position_plain']:12.1f} {r['us_per_position_shared']:13.1f} {r['speedup']:8.2f} "
                   f"{r['max_abs_logprob_diff']:10.2e}")
    return emit(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
