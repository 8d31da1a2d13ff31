"""Serving benchmark: wire bytes per scored position, and engine vs gRPC throughput.

    .venv/bin/python bench/serving.py                                   # defaults (what `make bench` runs)
    .venv/bin/python bench/serving.py --repeats 2 --batch 4 --out bench.json   # a quick smoke run
    .venv/bin/python bench/serving.py --threads 2 --layers 8 --hidden 512 --workdir runs/bench
    adpa bench serving --preset 8b --device cuda --dtype bfloat16 --skip-grpc --parts throughput \
        --batch 8 --seq-len 1024 --scored 512 --threads 8 --peak-tflops 989     # MFU of an 8B-like shape
    adpa bench serving --preset 1b --device cuda --dtype bfloat16 --models-dir /tmp/models --peak-tflops 989

Builds a tiny random teacher (seed 1) and reference (seed 2) with adpa.tiny_model (or, with
--preset, a shape of adpa.bench.presets: in memory, or saved under --models-dir when servers
need it), then
1. wire: the serialized ScoreResponse size / P for every support kind, signal and value dtype,
   built in process (ScoringService + codec.result_to_pb, no server), plus a *computed*
   projection to a real vocabulary (V=128256) from the payload formula the proto implies;
2. throughput: positions/s of ScoringEngine.score in process (with --preset, also of the model's
   forward alone: body and head on the scored rows, the engine's ceiling), and of the same batch through
   `adpa serve` subprocesses (reference: LOGPROBS; teacher with in-process reference: ADVANTAGE)
   called with TeacherClient, with equal torch threads on both sides.
Every throughput is also given in FLOP/s (and MFU against --peak-tflops), counted as
`adpa.bench.presets.scoring_flops` does: FLOPs per model forward = 2 x N_body x T + 2 x layers
x heads x head_dim x sum L(L+1) + 2 x hidden x V x P, with N_body the weights of the body's matrix
products (non-embedding, no norms, no head), T the forwarded tokens, L each sequence's length
(causal pairs) and P the scored positions (the engine runs the output head on them only); an
ADVANTAGE call runs two models (teacher and reference), so twice that.
Without --preset the tiny tokenizer's vocabulary is fixed at 77 tokens (70 words + 7 specials);
the presets have their own (128,256 for the Llama-3 shapes). JSON goes to stdout (or --out), a
readable table to stderr.
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
from adpa import codec
from adpa.bench.presets import FLOPS_FORMULA, PRESETS, build_model, model_shape, saved_model, scoring_flops
from adpa.client import TeacherClient
from adpa.services.engine import ScoringEngine
from adpa.services.launch import ServiceProcess
from adpa.protocol import ScoreQuery, SupportSpec
from adpa.services.reference import LocalReference
from adpa.services.prefix import shared_prefix_groups
from adpa.services.scoring import ScoringService
from adpa.tiny_model import make_tiny_model

REAL_VOCAB = 128256  # Llama 3
VALUE_BYTES = {"FP32": 4, "BF16": 2}
TENSOR_FIELDS = ("indices", "values", "tail", "weights")
MIB = 1 << 20
PARTS = ("wire", "throughput")


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--workdir", help="where the tiny models go (default: a temporary folder)")
    p.add_argument("--layers", type=int, default=4, help="transformer layers of the tiny models")
    p.add_argument("--hidden", type=int, default=256, help="hidden size of the tiny models")
    p.add_argument("--batch", type=int, default=16, help="sequences per request")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--scored", type=int, default=96, help="scored positions per sequence (the last ones)")
    p.add_argument("--k", type=int, default=32, help="k of TOPK / INDICES, n of SAMPLED")
    p.add_argument("--caller-ids", type=int, default=8, help="caller indices per position for INDICES")
    p.add_argument("--value-dtype", default="BF16", choices=sorted(VALUE_BYTES), help="values dtype over gRPC")
    p.add_argument("--threads", type=int, default=1, help="torch threads, here and in the servers (--torch-threads)")
    p.add_argument("--device", default="cpu", help="torch device for the engines and the servers (cpu, cuda, auto)")
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per measurement (the median is reported)")
    p.add_argument("--skip-grpc", action="store_true", help="measure only in process (no servers)")
    add_out(p)
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="model shape of adpa.bench.presets (random weights, its own vocabulary) instead of "
                   "--layers/--hidden and the 77-token tiny vocabulary")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype here and in the servers (default: float32 on cpu, else auto: bf16 on a GPU)")
    p.add_argument("--peak-tflops", type=float,
                   help="the device's peak dense TFLOP/s in that dtype (e.g. 989 for bf16 on an H100/H200 SXM): "
                   "adds MFU = achieved / peak to every throughput")
    p.add_argument("--parts", default=",".join(PARTS), help="comma-separated parts to run: wire, throughput")
    p.add_argument("--models-dir", help="with --preset and servers: where the checkpoints are saved, and reused "
                   "by later runs (default: --workdir)")
    p.add_argument("--logits-budget-mb", type=float, default=64,
                   help="the engines' and servers' logits budget (largest fp32 rows x V block)")
    p.add_argument("--max-batch-tokens", type=int, default=8192,
                   help="the engines' and servers' padded tokens per forward micro-batch")
    p.add_argument("--dense-max-mb", type=float, default=512,
                   help="wire: skip DENSE rows whose fp32 answer (P x V x 4 bytes) exceeds this (listed as skipped)")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown --parts {sorted(unknown)}; expected some of {list(PARTS)}")
    return args


def weights_dtype(args) -> str:
    return args.dtype or ("float32" if args.device == "cpu" else "auto")


def make_batch(args, vocab: int) -> tuple[list[torch.Tensor], list[tuple[int, int]]]:
    """`batch` random sequences; the last `scored` tokens are the response, scored by [L-1-scored, L-1)."""
    if not 0 < args.scored < args.seq_len:
        raise SystemExit(f"--scored must be in [1, {args.seq_len - 1}]")
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, vocab, (args.seq_len,), generator=g) for _ in range(args.batch)]
    return seqs, [(args.seq_len - 1 - args.scored, args.seq_len - 1)] * args.batch


def supports(args, positions: int, vocab: int) -> dict[str, SupportSpec]:
    caller = torch.randint(0, vocab, (positions, args.caller_ids), generator=torch.Generator().manual_seed(1))
    return {
        "topk": SupportSpec("topk", k=args.k),
        "indices": SupportSpec("indices", k=args.k, indices=caller),
        "sampled": SupportSpec("sampled", n=args.k, seed=3),
        "dense": SupportSpec("dense"),
    }


def payload_per_position(kind: str, width: int, value_bytes: int) -> int:
    """Bytes per position of the per-position tensors, as the proto lays them out (no framing)."""
    if kind == "dense":
        return width * value_bytes  # values only
    if kind == "sampled":
        return width * (4 + value_bytes + 4)  # int32 ids, values, fp32 weights; no tail
    return width * (4 + value_bytes) + 4  # int32 ids, values, fp32 tail


def measure_wire(args, service: ScoringService, seqs, ranges) -> list[dict]:
    positions = sum(e - s for s, e in ranges)
    specs = supports(args, positions, service.engine.shared_vocab)
    rows = []
    for kind, spec in specs.items():
        if kind == "dense" and positions * service.engine.vocab_size * 4 > args.dense_max_mb * MIB:
            continue  # print_table and the JSON's "wire_skipped" say so
        for signal in ("logprobs", "advantage"):
            for dtype in VALUE_BYTES:
                query = ScoreQuery(seqs, ranges, signal, spec, value_dtype=dtype, request_id="bench-0000000000")
                msg = codec.result_to_pb(service.score(query), query.request_id, dtype)
                total = msg.ByteSize()
                bare = type(msg)()
                bare.CopyFrom(msg)
                for name in TENSOR_FIELDS:
                    bare.ClearField(name)
                width = list(msg.values.shape)[1]
                real_width = {"dense": REAL_VOCAB, "indices": args.k + args.caller_ids}.get(kind, args.k)
                overhead = total / positions - payload_per_position(kind, width, VALUE_BYTES[dtype])
                rows.append({
                    "support": kind, "signal": signal, "value_dtype": dtype, "positions": positions,
                    "width": width, "response_bytes": total, "fixed_bytes": bare.ByteSize(),
                    "bytes_per_position": total / positions,
                    "framing_per_position": overhead,  # measured - formula: fingerprints, tags, shapes
                    "projected_width": real_width,
                    "projected_bytes_per_position": payload_per_position(kind, real_width, VALUE_BYTES[dtype]) + overhead,
                })
    return rows


def timed(fn, warmup: int, repeats: int) -> tuple[float, list[float]]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def rate(positions: int, median: float, times: list[float]) -> dict:
    return {"positions_per_s": positions / median, "median_s": median, "times_s": times}


def add_flops(result: dict, flops: float, peak_tflops: float | None) -> dict:
    """FLOP/s (and MFU) of a throughput entry whose call costs `flops`."""
    result["flops_per_call"] = flops
    result["tflops_per_s"] = flops / result["median_s"] / 1e12
    result["mfu"] = result["tflops_per_s"] / peak_tflops if peak_tflops else None
    return result


def measure_model_forward(args, engine: ScoringEngine, seqs, ranges) -> dict:
    """The model alone, as the engine's FLOPs count it: the body over the batch (micro-batches of at
    most --max-batch-tokens tokens, no padding: the sequences are of equal length) and the output
    head on the scored rows; no log-softmax, no support, nothing copied off the device. What the
    engine's own rate falls short of this is the engine's overhead."""
    model, per = engine.model, max(1, args.max_batch_tokens // args.seq_len)

    def forward():
        with torch.inference_mode():
            for i in range(0, len(seqs), per):
                ids = torch.stack(seqs[i : i + per]).to(engine.device)  # (n, L)
                hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # (n, L, H)
                rows = torch.cat([hidden[j, s:e] for j, (s, e) in enumerate(ranges[i : i + per])])  # (P_i, H)
                model.get_output_embeddings()(rows)  # (P_i, V)
        if engine.device.type == "cuda":
            torch.cuda.synchronize(engine.device)

    return rate(sum(e - s for s, e in ranges), *timed(forward, args.warmup, args.repeats))


def measure_in_process(args, service: ScoringService, seqs, ranges) -> dict:
    positions, spec = sum(e - s for s, e in ranges), SupportSpec("topk", k=args.k)
    engine_fn = lambda: service.reference.engine.score(seqs, ranges, spec)  # noqa: E731  (the served reference)
    adv_query = ScoreQuery(seqs, ranges, "advantage", spec, value_dtype=args.value_dtype)
    return {
        "engine_logprobs": rate(positions, *timed(engine_fn, args.warmup, args.repeats)),
        "service_advantage": rate(positions, *timed(lambda: service.score(adv_query), args.warmup, args.repeats)),
    }


def measure_grpc(args, service_args: list[str], signal: str, expected: tuple, seqs, ranges, log: Path) -> dict:
    """Start one `adpa serve`, time TeacherClient.score on the batch, and always stop the server."""
    positions, spec = sum(e - s for s, e in ranges), SupportSpec("topk", k=args.k)
    common = ["--device", args.device, "--torch-threads", str(args.threads), "--log-level", "WARNING",
              "--dtype", weights_dtype(args), "--logits-budget-mb", str(args.logits_budget_mb),
              "--max-batch-tokens", str(args.max_batch_tokens)]
    server = ServiceProcess([*service_args, *common], http=False, log_path=log)
    try:
        server.start()
        with TeacherClient(server.endpoint, timeout=600.0) as client:
            call = lambda: client.score(seqs, ranges, signal=signal, support=spec, value_dtype=args.value_dtype)  # noqa: E731
            answer = call()
            result = rate(positions, *timed(call, max(0, args.warmup - 1), args.repeats))
    finally:
        server.stop()
    # Same weights, same batch: the remote answer must be the in-process one (up to BF16 rounding).
    result["matches_in_process"] = bool(
        torch.equal(answer.indices, expected[0])
        and torch.allclose(answer.values, expected[1], **(dict(rtol=1e-2, atol=1e-2) if args.value_dtype == "BF16" else {}))
    )
    # In bf16 on a GPU two forwards may order near-ties differently: how many ids agree says how far apart.
    result["index_agreement"] = float((answer.indices == expected[0]).float().mean())
    return result


def params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def print_table(doc: dict) -> None:
    cfg = doc["config"]
    if cfg.get("preset"):
        m = doc["model"]
        model = (f"vocab V={doc['vocab_size']}; preset {cfg['preset']}: {m['layers']}x{m['hidden']}, {m['heads']} heads, "
                 f"{m['kv_heads']} kv heads, {params(m['params_total'])} params, {m['dtype']}")
    else:
        model = f"vocab V={doc['vocab_size']} (fixed by adpa.tiny_model); model {cfg['layers']}x{cfg['hidden']}"
    table_line(f"{model}; batch {cfg['batch']}x{cfg['seq_len']}, P={doc['positions']}; "
               f"torch {doc['torch']} on {doc['device']}, "
               f"{cfg['threads']} thread(s)")
    if "wire" in doc:
        print_wire(doc)
    if "throughput" in doc:
        print_throughput(doc)


def print_wire(doc: dict) -> None:
    table_line(f"\nwire: measured ScoreResponse bytes / P at V={doc['vocab_size']}; 'projected' is COMPUTED for "
               f"V={REAL_VOCAB} (formula + measured framing), not measured")
    table_line(f"{'support':8} {'signal':9} {'dtype':5} {'width':>5} {'B/pos':>9} {'framing':>8} "
               f"{'proj.width':>10} {'proj.B/pos':>11}")
    for r in doc["wire"]:
        table_line(f"{r['support']:8} {r['signal']:9} {r['value_dtype']:5} {r['width']:5d} {r['bytes_per_position']:9.1f} "
                   f"{r['framing_per_position']:8.2f} {r['projected_width']:10d} {r['projected_bytes_per_position']:11.1f}")
    if doc.get("wire_skipped"):
        table_line(f"skipped (answer over --dense-max-mb): {doc['wire_skipped']}")
    table_line(f"dense fp32 reference 4*V: {4 * doc['vocab_size']} B at V={doc['vocab_size']}, {4 * REAL_VOCAB} B at "
               f"V={REAL_VOCAB}; budget for top-32 BF16 advantage: <= 300 B/pos")


def print_throughput(doc: dict) -> None:
    cfg = doc["config"]
    table_line("\nthroughput (topk k={}, median of {}; timings on this machine only):".format(cfg["k"], cfg["repeats"]))
    for name, r in doc["throughput"].items():
        if isinstance(r, dict):
            extra = "" if "matches_in_process" not in r else f"  matches in process: {r['matches_in_process']}"
            if cfg.get("peak_tflops"):
                extra = f"  {r['tflops_per_s']:8.4g} TFLOP/s  MFU {100 * r['mfu']:5.1f}%" + extra
            table_line(f"  {name:28} {r['positions_per_s']:10.0f} positions/s{extra}")
        else:
            table_line(f"  {name:28} {r:10.3f}")
    if cfg.get("peak_tflops"):
        f = doc["flops"]
        table_line(f"FLOPs per model forward: {f['per_model']['total']:.4g} (body {f['per_model']['body']:.4g}, "
                   f"attention {f['per_model']['attention']:.4g}, head {f['per_model']['head']:.4g}); "
                   f"advantage = 2 forwards; peak {cfg['peak_tflops']:g} TFLOP/s")


def load_engines(args, work: Path) -> tuple[ScoringEngine, ScoringEngine, Path | None, Path | None]:
    """(teacher engine, reference engine, teacher folder, reference folder): tiny models saved in `work`
    by default; with --preset, built in memory, or saved (and reused) under --models-dir when the
    servers need folders to load."""
    engine_kw = dict(logits_budget_bytes=int(args.logits_budget_mb * MIB), max_batch_tokens=args.max_batch_tokens)
    load = dict(device=args.device, dtype=weights_dtype(args), **engine_kw)
    servers = "throughput" in args.parts.split(",") and not args.skip_grpc
    if args.preset is None:
        size = dict(layers=args.layers, hidden=args.hidden, max_seq_len=max(256, args.seq_len))
        teacher = make_tiny_model(work / "teacher", seed=1, **size)
        reference = make_tiny_model(work / "reference", seed=2, **size)
    elif servers:
        preset, models = PRESETS[args.preset], Path(args.models_dir or work)
        teacher = saved_model(preset, models, seed=1, device=args.device, dtype=weights_dtype(args))
        reference = saved_model(preset, models, seed=2, device=args.device, dtype=weights_dtype(args))
    else:  # no servers: no checkpoint on disk (an 8B-like pair would take minutes to save and load)
        preset = PRESETS[args.preset]
        tokenizer = preset.tokenizer()
        engines = [ScoringEngine(build_model(preset, seed=seed, device=args.device, dtype=weights_dtype(args)),
                                 tokenizer, name=f"random-{preset.name}-seed{seed}", model_hash=f"random-seed{seed}",
                                 **engine_kw) for seed in (1, 2)]
        return engines[0], engines[1], None, None
    engine = ScoringEngine.from_pretrained(str(teacher), **load)
    ref_engine = ScoringEngine.from_pretrained(str(reference), **load)
    return engine, ref_engine, teacher, reference


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()  # keep stderr for the table
    parts = args.parts.split(",")
    with tempfile.TemporaryDirectory(prefix="adpa-bench-") as tmp:
        work = Path(args.workdir or tmp)
        engine, ref_engine, teacher, reference = load_engines(args, work)
        service = ScoringService(engine, role="teacher", reference=LocalReference(ref_engine))
        seqs, ranges = make_batch(args, engine.shared_vocab)
        positions = sum(e - s for s, e in ranges)
        shape = model_shape(ref_engine.model)
        groups = shared_prefix_groups(seqs, engine.min_shared_prefix) if engine.min_shared_prefix else []
        saved = sum((len(members) - 1) * prefix for members, prefix in groups)  # random sequences: none
        per_model = scoring_flops(shape, [len(q) for q in seqs], positions, forwarded=sum(map(len, seqs)) - saved)
        doc = {
            "config": vars(args), "vocab_size": engine.vocab_size, "positions": positions,
            "note": (f"preset {args.preset}: random weights, vocabulary of {engine.vocab_size}" if args.preset else
                     "tiny_model's vocabulary is fixed at 77 tokens")
            + "; projected columns are computed, not measured",
            "torch": torch.__version__, "device": str(engine.device), "torch_threads": torch.get_num_threads(),
            "model": {"preset": args.preset, **shape},
            "flops": {"formula": FLOPS_FORMULA, "per_model": per_model, "shared_prefix_tokens_saved": saved,
                      "peak_tflops": args.peak_tflops, "models_per_call": {"logprobs": 1, "advantage": 2}},
        }
        if "wire" in parts:
            doc["wire"] = measure_wire(args, service, seqs, ranges)
            if positions * engine.vocab_size * 4 > args.dense_max_mb * MIB:
                doc["wire_skipped"] = [f"dense: {positions} x {engine.vocab_size} x 4 B = "
                                       f"{positions * engine.vocab_size * 4 / MIB:.0f} MiB > {args.dense_max_mb:g} MiB"]
        if "throughput" in parts:
            tp = {"model_forward": measure_model_forward(args, ref_engine, seqs, ranges)} if args.preset else {}
            doc["throughput"] = tp = {**tp, **measure_in_process(args, service, seqs, ranges)}
            if not args.skip_grpc:
                topk = SupportSpec("topk", k=args.k)
                ref_own = ref_engine.score(seqs, ranges, topk)
                ref_own = (ref_own.indices, ref_own.logprobs)
                adv = service.score(ScoreQuery(seqs, ranges, "advantage", topk))
                adv = (adv.indices, adv.values)
                tp["grpc_reference_logprobs"] = measure_grpc(
                    args, ["--role", "reference", "--model", str(reference)], "logprobs", ref_own, seqs, ranges,
                    work / "serve-reference.log")
                tp["grpc_teacher_advantage"] = measure_grpc(
                    args, ["--role", "teacher", "--model", str(teacher), "--reference", str(reference)], "advantage",
                    adv, seqs, ranges, work / "serve-teacher.log")
                tp["ratio_logprobs_grpc_over_engine"] = (
                    tp["grpc_reference_logprobs"]["positions_per_s"] / tp["engine_logprobs"]["positions_per_s"])
                tp["ratio_advantage_grpc_over_service"] = (
                    tp["grpc_teacher_advantage"]["positions_per_s"] / tp["service_advantage"]["positions_per_s"])
            for name, r in tp.items():
                if isinstance(r, dict):
                    add_flops(r, per_model["total"] * (2 if "advantage" in name else 1), args.peak_tflops)
    print_table(doc)
    return emit(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
