"""Training-step time against a teacher on loopback vs in process, with and without prefetch.

    .venv/bin/python bench/step_overhead.py                         # ADPA, 60 steps per setting
    .venv/bin/python bench/step_overhead.py --method dckd --steps 100 --out overhead.json
    adpa bench step_overhead --device cuda --teacher-preset 1b --models-dir /tmp/models --steps 20 --repeats 1

Builds a tiny teacher, reference and student offline, writes preference data from the built-in
world, starts `adpa serve` for the reference and the teacher (reference in the teacher's process),
then trains the same student for --steps steps three ways: teacher in process, teacher over gRPC
with prefetch 0, and over gRPC with prefetch --prefetch. Reports the mean step time of each
(Trainer's train_runtime / steps, which excludes start-up and offline sampling), median over
--repeats rounds in which the three settings alternate. Budget: remote
<= 1.10x in process; with prefetch, faster than in process. Prints JSON and a table.
With --teacher-preset the teacher and reference are a shape of adpa.bench.presets (random
weights, saved under --models-dir and reused) and the student shares its tokenizer; --device
puts the trainer, the in-process teacher and the service on that device.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import datasets
import torch
import transformers

from adpa.bench.report import add_out, benchmark_parser, emit, table_line
from adpa.bench.presets import PRESETS, saved_model
from adpa.demo.world import WORDS, World, WorldConfig
from adpa.services.launch import ServiceProcess
from adpa.tiny_model import make_tiny_model
from adpa.training.run import run_distill
from adpa.training.distill_config import DistillConfig
from adpa.training.teacher import LocalTeacher


def step_seconds(student: Path, records, out: Path, args, teacher: str, prefetch: int, local=None) -> float:
    config = DistillConfig(
        output_dir=str(out), method=args.method, teacher=teacher, max_steps=args.steps, prefetch=prefetch,
        per_device_train_batch_size=args.batch_size, learning_rate=1e-3, report_to=[],
        use_cpu=args.device in (None, "cpu"),
        save_strategy="no", disable_tqdm=True, support="indices" if args.method == "adpa" else "topk",
        student_k=8, support_k=16, max_new_tokens=16, logging_steps=args.steps,
    )
    trainer = run_distill(str(student), config, records, teacher=local, silent=True)
    runtime = next(e["train_runtime"] for e in trainer.state.log_history if "train_runtime" in e)
    return runtime / args.steps


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(__doc__, show_defaults=False)
    parser.add_argument("--method", default="adpa", choices=["adpa", "dckd"], help="default: %(default)s")
    parser.add_argument("--steps", type=int, default=60, help="steps per setting (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="records per step (default: %(default)s)")
    parser.add_argument("--prefetch", type=int, default=2, help="prefetch depth of the third setting (default: 2)")
    parser.add_argument("--teacher-shape", type=int, nargs=2, default=[4, 256], metavar=("LAYERS", "HIDDEN"),
                        help="teacher and reference size (default: 4 256)")
    parser.add_argument("--student-shape", type=int, nargs=2, default=[2, 128], metavar=("LAYERS", "HIDDEN"),
                        help="student size (default: 2 128)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats; medians reported (default: 3)")
    parser.add_argument("--workdir", help="keep models and data here (default: a temporary folder)")
    add_out(parser)
    parser.add_argument("--teacher-preset", choices=sorted(PRESETS),
                        help="teacher and reference shape of adpa.bench.presets instead of --teacher-shape; the "
                        "student takes the preset's tokenizer (e.g. 128,256 tokens)")
    parser.add_argument("--device", help="cpu or cuda, for the trainer, the in-process teacher and the service "
                        "(default: the trainer and in-process teacher on cpu, the service on its own default)")
    parser.add_argument("--dtype", default="auto", help="teacher weights dtype with --device (auto: bf16 on a GPU; "
                        "default: %(default)s)")
    parser.add_argument("--models-dir", help="with --teacher-preset: where its checkpoints are saved and reused "
                        "(default: the workdir)")
    args = parser.parse_args(argv)
    # One core for the trainer, one for the services: the comparison is about overlap, not threads.
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        paths = World(WorldConfig(num_sft=1, num_pairs=args.steps * args.batch_size, num_validation=1, num_test=1)
                      ).write(root / "data")
        records = datasets.load_dataset("json", data_files=str(paths["pairs"]), split="train")
        (tl, th), (sl, sh) = args.teacher_shape, args.student_shape
        words = WORDS
        if args.teacher_preset:
            preset, models = PRESETS[args.teacher_preset], Path(args.models_dir or root)
            device, dtype = args.device or "cpu", args.dtype if args.device else "float32"
            teacher = saved_model(preset, models, seed=1, device=device, dtype=dtype)
            reference = saved_model(preset, models, seed=2, device=device, dtype=dtype)
            words = preset.words()  # the student gets the same tokenizer as the teacher
        else:
            teacher = make_tiny_model(root / "teacher", layers=tl, hidden=th, seed=1, words=WORDS)
            reference = make_tiny_model(root / "reference", layers=tl, hidden=th, seed=2, words=WORDS)
        student = make_tiny_model(root / "student", layers=sl, hidden=sh, heads=4, seed=3, words=words)

        on_device = dict(device=args.device, dtype=args.dtype) if args.device else {}
        local = LocalTeacher.from_paths(str(teacher), str(reference), beta=0.1, **on_device)
        serve = ["--role", "teacher", "--model", str(teacher), "--reference", str(reference), "--beta", "0.1"]
        if args.device:
            serve += ["--device", args.device, "--dtype", args.dtype]
        runs: dict[str, list[float]] = {"in_process": [], "grpc_prefetch_0": [], f"grpc_prefetch_{args.prefetch}": []}
        with ServiceProcess(serve, env={"ADPA_TORCH_THREADS": "1", "OMP_NUM_THREADS": "1"}, http=False) as service:
            # Settings alternate within each repeat, so slow drifts of the machine hit all of them.
            for repeat in range(args.repeats):
                out = root / f"run-{repeat}"
                runs["in_process"].append(step_seconds(student, records, out / "local", args, "local", 0, local))
                runs["grpc_prefetch_0"].append(step_seconds(student, records, out / "remote0", args, service.endpoint, 0))
                runs[f"grpc_prefetch_{args.prefetch}"].append(
                    step_seconds(student, records, out / "remote", args, service.endpoint, args.prefetch))
        results = {name: statistics.median(times) for name, times in runs.items()}

    report = {"config": vars(args), "step_seconds": results, "runs": runs,
              "ratio_to_in_process": {k: v / results["in_process"] for k, v in results.items()}}
    emit(report, args.out)
    shape = f"preset {args.teacher_preset}" if args.teacher_preset else f"{tl}x{th}"
    where = f" on {args.device}" if args.device else ""
    table_line(f"{args.method}, median of {args.repeats}, {args.steps} steps of {args.batch_size} records, "
               f"teacher+reference {shape}, "
               f"student {sl}x{sh}{where}, 1 torch thread in the trainer and 1 in the service")
    for name, seconds in results.items():
        table_line(f"  {name:<20} {1000 * seconds:8.1f} ms/step  {seconds / results['in_process']:.2f}x in process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
