"""What sparse supports lose on trained models: the built-in world's DPO teacher, its SFT reference and
the SFT student, at the student's own samples.

    .venv/bin/python bench/fidelity_real.py --workdir runs/demo        # after `adpa demo` (its models)
    .venv/bin/python bench/fidelity_real.py --workdir runs/fid --build  # trains the world's stage 0 first

For `--prompts` validation prompts, the student samples one response each; the teacher and the
reference score every response position densely (the scoring engine, fp32), and the student's
logits there are the point where gradients are taken. Each support is then built from the
teacher's dense row with the service's own functions (`adpa.sparse`), and the training losses
(`adpa.training.losses`) are compared with their dense forms:
- ADPA: the cosine between the sparse and the dense gradient of -G on the student's logits;
- KL(pi_dpo || pi_theta): the relative error of the value and the cosine of the gradients.
`topk`/`indices` (the student's top-k and its sampled token, united with the teacher's top-k)
for every k; `sampled` (n draws with importance weights: unbiased) for every n, averaged over
`--repeats` independent draws (mean |error|, mean signed error = bias, mean cosine). The world's
vocabulary is small, so a support of V tokens or more is the dense one. JSON on stdout (or
--out), a table on stderr.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from adpa import sparse
from adpa.bench.report import add_out, benchmark_parser, emit, table_line
from adpa.protocol import SupportSpec
from adpa.services.engine import ScoringEngine
from adpa.training import losses
from adpa.training.batch import make_batch
from adpa.training.data import encode_prompt, load_records
from adpa.training.rollout import generate_responses


def parse_args(argv=None) -> argparse.Namespace:
    p = benchmark_parser(__doc__)
    p.add_argument("--workdir", default="runs/demo", help="an `adpa demo` workdir (models/, data/)")
    p.add_argument("--build", action="store_true", help="train the world's stage-0 models into --workdir first")
    p.add_argument("--prompts", type=int, default=64, help="validation prompts (one student sample each)")
    p.add_argument("--ks", default="4,8,16,32,64", help="comma-separated k of topk / indices")
    p.add_argument("--ns", default="4,8,16,32,64", help="comma-separated n of sampled")
    p.add_argument("--student-k", type=int, default=8, help="indices: the student's own top-k")
    p.add_argument("--temperature", type=float, default=1.0, help="sampled: the proposal's temperature")
    p.add_argument("--repeats", type=int, default=20, help="sampled: independent draws averaged")
    p.add_argument("--beta", type=float, default=0.1, help="advantage scale")
    p.add_argument("--seed", type=int, default=0)
    add_out(p)
    return p.parse_args(argv)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0))


def gradient(logits: torch.Tensor, fn) -> tuple[float, torch.Tensor]:
    z = logits.clone().requires_grad_(True)
    value = fn(z)
    value.backward()
    return float(value.detach()), z.grad


def world(args) -> Path:
    workdir = Path(args.workdir)
    if args.build:
        from adpa.demo.config import DemoConfig
        from adpa.demo.pipeline import DemoRun

        DemoRun(DemoConfig.load(), workdir).build()
    if not (workdir / "models/teacher/config.json").exists():
        raise SystemExit(f"{workdir} holds no trained world: run `adpa demo --workdir {workdir}`, or pass --build")
    return workdir


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    hf_logging.disable_progress_bar()
    work = world(args)
    models = work / "models"
    tokenizer = AutoTokenizer.from_pretrained(models / "student-sft")
    student = AutoModelForCausalLM.from_pretrained(models / "student-sft").eval()
    records = load_records(str(work / "data/validation.jsonl"))
    prompts = [encode_prompt(tokenizer, r["prompt"]) for r in records.select(range(min(args.prompts, len(records))))]
    samples = generate_responses(student, tokenizer, prompts, max_new_tokens=12, seed=args.seed)
    samples = [s or [tokenizer.eos_token_id] for s in samples]
    batch = make_batch(prompts, samples, tokenizer.pad_token_id or 0)

    # Dense rows at every scored position: the served engines for pi_dpo and pi_ref, the student's logits.
    dense = SupportSpec("dense")
    teacher = ScoringEngine.from_pretrained(str(models / "teacher"), device="cpu", dtype="float32")
    reference = ScoringEngine.from_pretrained(str(models / "reference"), device="cpu", dtype="float32")
    logp_t = teacher.score(batch.sequences, batch.ranges, dense).logprobs  # (P, V)
    logp_r = reference.score(batch.sequences, batch.ranges, dense).logprobs  # (P, V)
    with torch.no_grad():
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.mask]  # (P, V)
    P, V = logp_t.shape
    z = logits[None]  # (1, P, V): one "sequence" of P scored positions
    mask = torch.ones(1, P, dtype=torch.bool)
    advantage = args.beta * (logp_t - logp_r)
    _, adpa_dense = gradient(z, lambda s: losses.dense_adpa_loss(advantage[None], s, mask, gamma=1.0))
    kl_dense, kl_dense_grad = gradient(z, lambda s: losses.dense_kl(logp_t[None], s, mask))
    sampled_token = batch.targets[batch.mask][:, None]  # (P, 1)

    rows = []
    for kind in ("topk", "indices"):
        for k in (int(x) for x in args.ks.split(",")):
            k_eff = min(k, V)
            if kind == "topk":
                idx, vals, tail = sparse.topk(logp_t, k_eff)
            else:
                own = torch.cat([logits.topk(min(args.student_k, V), -1).indices, sampled_token], -1)
                idx, vals, tail = sparse.union_with_topk(logp_t, own, k_eff)
            ref_vals = sparse.gather(logp_r, idx)
            adv = sparse.advantage(vals, ref_vals, args.beta)
            adv_tail = sparse.advantage(tail, sparse.log_tail_mass(logp_r, idx), args.beta)
            _, g = gradient(z, lambda s: losses.sparse_adpa_loss(idx[None], adv[None], adv_tail[None], s, mask, 1.0))
            kl, kl_g = gradient(z, lambda s: losses.sparse_kl(idx[None], vals[None], tail[None], s, mask))
            rows.append({"support": kind, "k": k, "width": int((idx >= 0).sum(-1).float().mean()),
                         "adpa_grad_cosine": cosine(g, adpa_dense), "kl_rel_error": (kl - kl_dense) / kl_dense,
                         "kl_grad_cosine": cosine(kl_g, kl_dense_grad),
                         "teacher_mass": float(vals.masked_fill(idx < 0, float("-inf")).exp().sum(-1).mean())})
    g_uniforms = torch.Generator().manual_seed(args.seed + 1)
    for n in (int(x) for x in args.ns.split(",")):
        adpa_cos, kl_err, kl_cos = [], [], []
        for _ in range(args.repeats):
            uniforms = torch.rand(P, n, generator=g_uniforms, dtype=torch.float64)
            idx, vals, w = sparse.sample(logp_t, uniforms, args.temperature)
            adv = sparse.advantage(vals, sparse.gather(logp_r, idx), args.beta)
            _, g = gradient(z, lambda s: losses.sampled_adpa_loss(idx[None], adv[None], vals[None], w[None], s, mask, 1.0))
            kl, kl_g = gradient(z, lambda s: losses.sampled_kl(idx[None], vals[None], w[None], s, mask))
            adpa_cos.append(cosine(g, adpa_dense))
            kl_err.append((kl - kl_dense) / kl_dense)
            kl_cos.append(cosine(kl_g, kl_dense_grad))
        rows.append({"support": "sampled", "k": n, "width": n, "adpa_grad_cosine": statistics.fmean(adpa_cos),
                     "kl_rel_error": statistics.fmean(abs(e) for e in kl_err), "kl_bias": statistics.fmean(kl_err),
                     "kl_grad_cosine": statistics.fmean(kl_cos), "repeats": args.repeats})

    doc = {"config": vars(args), "positions": P, "vocab_size": V, "dense_kl": kl_dense, "rows": rows}
    table_line(f"built-in world ({work}): DPO teacher, SFT reference, SFT student; {len(prompts)} student samples, "
               f"P={P} scored positions, V={V}, beta={args.beta}; dense KL {kl_dense:.4f}")
    table_line(f"{'support':8} {'k/n':>4} {'width':>5} {'ADPA grad cos':>13} {'KL rel err':>10} {'KL bias':>8} "
               f"{'KL grad cos':>11} {'teacher mass':>12}")
    for r in rows:
        bias = f"{100 * r['kl_bias']:7.2f}%" if "kl_bias" in r else f"{'':8}"
        mass = f"{r['teacher_mass']:12.3f}" if "teacher_mass" in r else ""
        table_line(f"{r['support']:8} {r['k']:4d} {r['width']:5d} {r['adpa_grad_cosine']:13.4f} "
                   f"{100 * r['kl_rel_error']:9.2f}% {bias} {r['kl_grad_cosine']:11.4f} {mass}")
    table_line("sampled: mean over repeats of |relative error| (KL rel err), of the signed error (KL bias) "
               "and of the cosines")
    return emit(doc, args.out)


if __name__ == "__main__":
    sys.exit(main())
