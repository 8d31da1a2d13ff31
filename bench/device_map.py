"""One model over several GPUs: a teacher loaded with device_map=auto (accelerate's big-model loading)
answers as the same model on one device does.

    adpa bench device_map --out device_map.json                     # needs 2 GPUs
    adpa bench device_map --device cpu --device-map cpu              # the plumbing, on a CPU

A random-init Llama (--hidden, --layers, --vocab) is saved once, then loaded twice through
`ScoringEngine.from_pretrained`: on --device alone, and with --device-map (max_memory caps GPU 0
so the layers must spread over two GPUs). Both score the same batch: dense fp32 log-probs
compared (max abs difference, budget --atol) and top-k ids compared (agreement). Reported: the
device map's devices, both answers' wall time, and whether they agree. JSON on stdout (or --out),
a line on stderr; exit status 1 when they do not agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from adpa.bench.report import add_out, benchmark_parser, emit, table_line


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--device", default="cuda:0", help="the single device the reference answer runs on")
    p.add_argument("--device-map", default="auto", help="device_map of the spread model")
    p.add_argument("--max-memory", default=None,
                   help="max_memory of the spread model (default on CUDA: GPU 0 capped at half the model)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights dtype")
    p.add_argument("--hidden", type=int, default=1024, help="hidden size")
    p.add_argument("--layers", type=int, default=8, help="layers")
    p.add_argument("--vocab", type=int, default=32000, help="vocabulary")
    p.add_argument("--batch", type=int, default=4, help="sequences")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (the last half scored)")
    p.add_argument("--k", type=int, default=16, help="top-k compared")
    p.add_argument("--atol", type=float, default=1e-4, help="largest dense log-prob difference accepted (fp32)")
    add_out(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models

    from adpa.protocol import SupportSpec
    from adpa.services.config import parse_max_memory
    from adpa.services.engine import ScoringEngine

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                             num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                             tie_word_embeddings=False)
        torch.manual_seed(0)
        LlamaForCausalLM(config).save_pretrained(path)
        vocab = {f"t{i}": i for i in range(args.vocab)}
        PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                pad_token="t0").save_pretrained(path)
        max_memory = args.max_memory
        if max_memory is None and args.device_map != "cpu":
            half = sum(f.stat().st_size for f in path.glob("*.safetensors")) // 2
            max_memory = f"0={half}B,1=80GiB"
        g = torch.Generator().manual_seed(1)
        sequences = [torch.randint(0, args.vocab, (args.seq_len,), generator=g) for _ in range(args.batch)]
        ranges = [(args.seq_len // 2, args.seq_len)] * args.batch
        answers, walls = [], []
        for placement in ({"device": args.device},
                          {"device_map": args.device_map,
                           "max_memory": parse_max_memory(max_memory) if max_memory else None}):
            engine = ScoringEngine.from_pretrained(str(path), dtype=args.dtype, batching=False, **placement)
            started = time.perf_counter()
            answers.append((engine.score(sequences, ranges, SupportSpec("dense")).logprobs,
                            engine.score(sequences, ranges, SupportSpec("topk", k=args.k)).indices))
            walls.append(time.perf_counter() - started)
            devices = sorted({str(p.device) for p in engine.model.parameters()})
            del engine
    (dense_1, top_1), (dense_n, top_n) = answers
    diff = float((dense_1 - dense_n).abs().max())
    agreement = float((top_1 == top_n).float().mean())
    doc = {"device": args.device, "device_map": args.device_map, "max_memory": max_memory,
           "spread_devices": devices, "max_abs_diff": diff, "atol": args.atol, "topk_agreement": agreement,
           "single_s": walls[0], "spread_s": walls[1], "agree": diff <= args.atol,
           "command": " ".join(["adpa bench device_map", *(argv if argv is not None else sys.argv[1:])])}
    table_line(f"device_map={args.device_map} over {devices}: max |diff| {diff:.2e} (atol {args.atol}), top-{args.k} "
               f"agreement {agreement:.4f}, {walls[1]:.2f}s vs {walls[0]:.2f}s on {args.device}")
    emit(doc, args.out)
    return 0 if doc["agree"] else 1
