"""Memory per request: a scoring server's extra peak memory for one request, as the scored positions
and the vocabulary grow, top-k against dense answers.

    .venv/bin/python bench/memory.py                      # V in {32000, 128256}, P up to 16384 (a few minutes)
    .venv/bin/python bench/memory.py --vocabs 32000 --positions 1024,4096 --supports topk   # quick
    .venv/bin/python bench/memory.py --device cuda --hidden 4096 --layers 2                  # on a GPU

Each point runs in a fresh process: a random-init Llama with the given vocabulary and a small
hidden size (the vocabulary, not the body, is what a request's memory scales with), one warm-up
request, then the measured one: `ScoringService.score` and the protobuf encoding of its answer,
as the server does them. Reported: the process's resident memory before the request, its peak
during it (sampled every millisecond, and the kernel's high-water mark), the extra = peak -
before, and on CUDA `torch.cuda.max_memory_allocated` over the request. Budget (DESIGN.md):
extra <= 1 GiB at 8k positions x 128k vocabulary for top-k answers, growing with positions x k
plus one chunk x V, not positions x V. JSON on stdout (or --out), a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

from adpa.bench.report import add_out, benchmark_parser, emit, table_line

GIB = 1 << 30
MIB = 1 << 20


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--vocabs", default="32000,128256", help="comma-separated vocabulary sizes")
    p.add_argument("--positions", default="1024,2048,4096,8192,16384", help="comma-separated scored positions")
    p.add_argument("--supports", default="topk,dense", help="comma-separated: topk, dense")
    p.add_argument("--dense-max-gib", type=float, default=1.5,
                   help="skip dense points whose fp32 answer alone (P x V x 4 bytes) exceeds this (a protobuf "
                   "message cannot exceed 2 GiB)")
    p.add_argument("--k", type=int, default=32, help="top-k of the support")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per sequence (every position scored)")
    p.add_argument("--layers", type=int, default=2, help="layers of the random model")
    p.add_argument("--hidden", type=int, default=64, help="hidden size of the random model")
    p.add_argument("--logits-budget-mb", type=float, default=64, help="the engine's logits_budget_mb")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="the model's weights dtype (a server on a GPU runs bfloat16)")
    add_out(p)
    p.add_argument("--point", help=argparse.SUPPRESS)  # internal: measure one point (JSON args) and exit
    return p.parse_args(argv)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure_point(point: dict) -> dict:
    """One (vocab, positions, support) point, in this (fresh) process."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adpa import codec
    from adpa.protocol import ScoreQuery, SupportSpec
    from adpa.services.engine import ScoringEngine
    from adpa.services.scoring import ScoringService
    from adpa.protocol import Limits
    from adpa.tiny_model import SPECIAL_TOKENS, build_tokenizer

    torch.set_num_threads(1)
    vocab, positions, seq_len = point["vocab"], point["positions"], point["seq_len"]
    config = LlamaConfig(vocab_size=vocab, hidden_size=point["hidden"], intermediate_size=2 * point["hidden"],
                         num_hidden_layers=point["layers"], num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=max(seq_len, 256), tie_word_embeddings=False)
    torch.manual_seed(0)
    device = torch.device(point["device"])
    model = LlamaForCausalLM(config).to(device=device, dtype=getattr(torch, point.get("dtype", "float32")))
    # A tokenizer as wide as the model: every id is a real token (none is padding the engine would cut off).
    tokenizer = build_tokenizer([f"w{i}" for i in range(vocab - len(SPECIAL_TOKENS))])
    engine = ScoringEngine(model, tokenizer, name=f"random-{vocab}", model_hash="-",
                           logits_budget_bytes=int(point["logits_budget_mb"] * MIB), batching=False)
    limits = Limits(max_positions=1 << 20, max_dense_positions=1 << 20, max_message_bytes=1 << 40)
    service = ScoringService(engine, role="reference", limits=limits)
    g = torch.Generator().manual_seed(1)
    count = (positions + seq_len - 1) // seq_len
    seqs = [torch.randint(0, vocab, (seq_len,), generator=g) for _ in range(count)]
    ranges = [(0, min(seq_len, positions - i * seq_len)) for i in range(count)]
    spec = SupportSpec("topk", k=point["k"]) if point["support"] == "topk" else SupportSpec("dense")

    def request(seqs, ranges):
        result = service.score(ScoreQuery(seqs, ranges, "logprobs", spec, value_dtype="FP32"))
        return codec.result_to_pb(result, "", "FP32").ByteSize()

    request(seqs[:1], [(0, 8)])  # warm-up: kernels, allocator pools
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        cuda_before = torch.cuda.memory_allocated()
    before, high_before = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.wait(0.001):
            peak[0] = max(peak[0], rss())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    answer_bytes = request(seqs, ranges)
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    high_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    out = {**point, "seconds": seconds, "answer_bytes": answer_bytes, "rss_before": before,
           "rss_peak_sampled": peak[0], "rss_high_water": high_after,
           "extra_bytes": max(peak[0], high_after if high_after > high_before else 0) - before}
    if device.type == "cuda":
        out["cuda_extra_bytes"] = torch.cuda.max_memory_allocated() - cuda_before
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.point:
        print(json.dumps(measure_point(json.loads(args.point))))
        return 0
    points = []
    for vocab in (int(v) for v in args.vocabs.split(",")):
        for support in args.supports.split(","):
            for positions in (int(p) for p in args.positions.split(",")):
                if support == "dense" and positions * vocab * 4 > args.dense_max_gib * GIB:
                    continue
                point = {"vocab": vocab, "positions": positions, "support": support, "k": args.k,
                         "seq_len": args.seq_len, "layers": args.layers, "hidden": args.hidden,
                         "logits_budget_mb": args.logits_budget_mb, "device": args.device, "dtype": args.dtype}
                run = subprocess.run([sys.executable, __file__, "--point", json.dumps(point)],
                                     capture_output=True, text=True, check=False)
                if run.returncode != 0:
                    raise SystemExit(f"point {point} failed:\n{run.stderr[-3000:]}")
                points.append(json.loads(run.stdout.strip().splitlines()[-1]))
                r = points[-1]
                table_line(f"V={vocab} P={positions} {support}: extra {r['extra_bytes'] / MIB:.0f} MiB")
    budget = next((p for p in points if p["vocab"] >= 128000 and p["positions"] == 8192 and p["support"] == "topk"), None)
    doc = {"config": {k: v for k, v in vars(args).items() if k != "point"}, "points": points,
           "budget": {"limit_bytes": GIB, "point": budget,
                      "met": None if budget is None else budget["extra_bytes"] <= GIB}}
    table_line(f"random Llama {args.layers}x{args.hidden}, sequences of {args.seq_len} tokens, logits budget "
               f"{args.logits_budget_mb:g} MiB, top-{args.k}, {args.device}")
    table_line(f"{'V':>7} {'support':7} {'P':>6} {'before MiB':>10} {'peak MiB':>9} {'extra MiB':>9} {'answer MiB':>10} "
               f"{'P*V*4 MiB':>9}" + (f" {'cuda MiB':>8}" if args.device.startswith("cuda") else ""))
    for r in points:
        table_line(f"{r['vocab']:7d} {r['support']:7} {r['positions']:6d} {r['rss_before'] / MIB:10.0f} "
                   f"{max(r['rss_peak_sampled'], r['rss_high_water']) / MIB:9.0f} {r['extra_bytes'] / MIB:9.0f} "
                   f"{r['answer_bytes'] / MIB:10.1f} {r['positions'] * r['vocab'] * 4 / MIB:9.0f}"
                   + (f" {r['cuda_extra_bytes'] / MIB:8.0f}" if "cuda_extra_bytes" in r else ""))
    if budget is not None:
        table_line(f"budget: extra <= 1024 MiB at P=8192, V={budget['vocab']}, top-k: "
                   f"{budget['extra_bytes'] / MIB:.0f} MiB, {'met' if doc['budget']['met'] else 'NOT met'}")
    return emit(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
