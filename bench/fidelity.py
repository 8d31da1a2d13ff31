"""What sparse supports lose: sparse vs dense ADPA gradients and DCKD KL, at real vocabulary sizes.

    .venv/bin/python bench/fidelity.py                      # V=128256, 256 positions, k in 8..64
    .venv/bin/python bench/fidelity.py --vocab 32000 --positions 512 --out fidelity.json

The distributions are synthetic, not a model's: each teacher row is Zipf-shaped, p(rank r) ∝ r^-a,
with a per position in --zipf (flat to confident rows); the student's logits and the reference
are the teacher's plus independent Gaussian noise
(--student-noise, --reference-noise). For each support the script computes, with the project's
own support and loss functions:
- the cosine between the sparse and the dense ADPA gradient on the student's logits (budget >= 0.99),
- the relative error of the sparse (top-k + tail bucket) KL against the dense KL (budget <= 1%),
  and the cosine between their gradients (what training follows).
Prints JSON (stdout or --out) and a table (stderr).
"""

from __future__ import annotations

import sys

import torch

from adpa import sparse
from adpa.bench.report import add_out, benchmark_parser, emit, table_line
from adpa.training import losses


def synthetic(vocab: int, positions: int, zipf: tuple[float, float], student_noise: float, reference_noise: float,
              seed: int):
    """Zipf-shaped teacher rows: p(token of rank r) ∝ r^-a, with a drawn per position from `zipf`
    (small a: flat positions, large a: confident ones), tokens ranked in a random order per position."""
    g = torch.Generator().manual_seed(seed)
    exponent = torch.empty(positions, 1).uniform_(*zipf, generator=g)
    ranks = torch.rand(positions, vocab, generator=g).argsort(-1).argsort(-1).float() + 1  # a random ranking
    base = (-exponent * ranks.log())[None]  # (1, P, V)
    teacher = base.log_softmax(-1)
    student = base + torch.randn(base.shape, generator=g) * student_noise
    reference = (base + torch.randn(base.shape, generator=g) * reference_noise).log_softmax(-1)
    return teacher, reference, student


def gradient(student: torch.Tensor, fn) -> torch.Tensor:
    logits = student.clone().requires_grad_(True)
    fn(logits).backward()
    return logits.grad.flatten()


def measure(args) -> dict:
    torch.set_num_threads(args.threads)
    teacher, reference, student = synthetic(args.vocab, args.positions, tuple(args.zipf), args.student_noise,
                                            args.reference_noise, args.seed)
    mask = torch.ones(teacher.shape[:2], dtype=torch.bool)
    dense_adv = args.beta * (teacher - reference)
    dense_grad = gradient(student, lambda s: losses.dense_adpa_loss(dense_adv, s, mask, gamma=1.0))
    dense_kl = losses.dense_kl(teacher, student, mask)
    dense_kl_grad = gradient(student, lambda s: losses.dense_kl(teacher, s, mask))
    rows = []
    t, r = teacher[0], reference[0]
    sampled_token = student[0].softmax(-1).multinomial(1, generator=torch.Generator().manual_seed(args.seed))
    for k in args.k:
        # topk: the teacher's k best; indices: the student's k best + the sampled token, united with the teacher's k.
        topk_idx, topk_lp, topk_tail = sparse.topk(t, k)
        student_top = student[0].topk(k, dim=-1).indices
        union_idx, union_lp, union_tail = sparse.union_with_topk(t, torch.cat([student_top, sampled_token], -1), k)
        for name, idx, lp, tail in (("topk", topk_idx, topk_lp, topk_tail), ("indices", union_idx, union_lp, union_tail)):
            adv = sparse.advantage(lp, sparse.gather(r, idx), args.beta).masked_fill(idx < 0, 0.0)
            adv_tail = sparse.advantage(tail, sparse.log_tail_mass(r, idx), args.beta)
            grad = gradient(student, lambda s: losses.sparse_adpa_loss(
                idx[None], adv[None], adv_tail[None], s, mask, gamma=1.0))
            cosine = float(torch.nn.functional.cosine_similarity(grad, dense_grad, dim=0))
            sparse_kl = losses.sparse_kl(idx[None], lp[None], tail[None], student, mask)
            kl_grad = gradient(student, lambda s: losses.sparse_kl(idx[None], lp[None], tail[None], s, mask))
            rows.append({
                "support": name, "k": k, "width": int((idx >= 0).sum(-1).float().mean()),
                "adpa_grad_cosine": cosine,
                "kl_dense": float(dense_kl), "kl_sparse": float(sparse_kl),
                "kl_rel_error": float((dense_kl - sparse_kl) / dense_kl),
                "kl_grad_cosine": float(torch.nn.functional.cosine_similarity(kl_grad, dense_kl_grad, dim=0)),
                "teacher_mass_on_support": float(lp.exp().masked_fill(idx < 0, 0).sum(-1).mean()),
            })
    return {"config": vars(args), "results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, show_defaults=False)
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size (default: %(default)s)")
    parser.add_argument("--positions", type=int, default=256, help="scored positions (default: %(default)s)")
    parser.add_argument("--k", type=int, nargs="+", default=[8, 16, 32, 64], help="support sizes (default: 8 16 32 64)")
    parser.add_argument("--zipf", type=float, nargs=2, default=[1.1, 2.5], metavar=("LOW", "HIGH"),
                        help="range of the per-position Zipf exponent of teacher rows (default: 1.1 2.5)")
    parser.add_argument("--student-noise", type=float, default=0.5, help="student = teacher + noise (default: %(default)s)")
    parser.add_argument("--reference-noise", type=float, default=0.5, help="reference = teacher + noise (default: %(default)s)")
    parser.add_argument("--beta", type=float, default=0.1, help="advantage scale (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    add_out(parser)
    args = parser.parse_args(argv)
    result = measure(args)
    emit(result, args.out)
    table_line(f"synthetic Zipf rows (exponent {args.zipf[0]}-{args.zipf[1]}), V={args.vocab}, {args.positions} positions, "
               f"student noise {args.student_noise}, reference noise {args.reference_noise}")
    table_line(f"{'support':<8} {'k':>4} {'width':>6} {'ADPA grad cos':>14} {'KL rel err':>11} {'KL grad cos':>12} "
               f"{'teacher mass':>13}")
    for row in result["results"]:
        table_line(f"{row['support']:<8} {row['k']:>4} {row['width']:>6} {row['adpa_grad_cosine']:>14.4f} "
                   f"{100 * row['kl_rel_error']:>10.2f}% {row['kl_grad_cosine']:>12.4f} "
                   f"{row['teacher_mass_on_support']:>13.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
